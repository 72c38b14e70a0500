"""Churn scenarios for the swarm launcher: peers that join late, leave, crash and come back.

A scenario is a comma-separated list of events (``swarm --churn``)::

    join=10%@r5     10% of the peers are not started at launch; each is started with --join once
                    the leading peer has done round 5, and begins from its neighbours' state
    leave=2@r8      2 peers get SIGTERM once they have done round 8: they announce ``stopped``
                    (the tracker drops them at once) and leave for good
    kill=5%@r6      5% of the peers get SIGKILL once they have done round 6; each is started
                    again with --resume one round later (once the leading peer is a round past
                    where it was at the kill); ``kill=5%@r6+3`` waits 3 rounds, ``+0`` restarts
                    as soon as the process is gone
    tracker@r4      the launcher's own tracker stops once the leading peer has done round 4 and
                    starts again on the same port and SQLite store a round later (``+K`` as for
                    kill); peers keep going on their cached answers meanwhile

An amount is a count or a percentage of ``--peers`` (rounded to the nearest peer, at least one).
Which peers churn is drawn once from the session's seed, so a scenario is the same on every
run; the peers an event picks are distinct from every other event's, and the attackers of an
experiment never churn. A peer touched by churn always has a process of its own.

:class:`ChurnDriver` acts on what the launcher polls (each peer's ``status.json`` round) and
keeps a log of what it did in ``<out>/churn.json``; :func:`churn_summary` turns that log and the
peers' folders into each peer's fate (``joined@r5, finished``, ``left@r8``, ``killed@r6,
resumed@r7, finished``) for the run summary. Everything here is plumbing: no torch, no sockets.
"""

from __future__ import annotations

import math
import random
import re
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fedtorrent.errors import ConfigError, DataError
from fedtorrent.metrics.records import read_json, write_json

CHURN_FILE = "churn.json"
"""The driver's log in the run folder: the scenario, the plan and every event, with times."""
JOINED_FILE = "joined.json"
"""What a ``--join`` peer writes into its ``--out``: the round it joined at and its sources."""
KINDS = ("join", "leave", "kill", "tracker")
_EVENT = re.compile(
    r"(?P<kind>[a-z]+)(?:=(?P<amount>\d+(?:\.\d+)?)(?P<percent>%)?)?@r(?P<round>\d+)"
    r"(?:\+(?P<back>\d+))?"
)


@dataclass(frozen=True)
class ChurnEvent:
    """One entry of a scenario, as written (``amount`` is a count, or a percentage)."""

    kind: str
    amount: float
    percent: bool
    round: int
    """The trigger: a peer's own rounds done (leave, kill) or the leading peer's (join,
    tracker)."""
    back: int = 1
    """Rounds until a killed peer or the tracker is started again (kill, tracker only)."""

    def count(self, peers: int) -> int:
        """How many peers this event picks out of ``peers``."""
        if not self.percent:
            return int(self.amount)
        return max(1, math.floor(self.amount / 100 * peers + 0.5))


@dataclass(frozen=True)
class ChurnSpec:
    """A parsed scenario; :meth:`parse` is the only way in from text."""

    text: str
    events: tuple[ChurnEvent, ...]

    @classmethod
    def parse(cls, text: str) -> ChurnSpec:
        """Parse ``join=10%@r5,leave=2@r8,kill=5%@r6+1,tracker@r4``.

        Raises:
            ConfigError: one line naming the entry that is wrong and why.
        """
        events = []
        for raw in text.split(","):
            entry = raw.strip()
            match = _EVENT.fullmatch(entry)
            if match is None:
                raise ConfigError(
                    f"--churn entry {entry!r} is not KIND=AMOUNT@rROUND (e.g. join=10%@r5, "
                    "leave=2@r8, kill=5%@r6+1, tracker@r4)"
                )
            kind, amount, back = match["kind"], match["amount"], match["back"]
            if kind not in KINDS:
                raise ConfigError(
                    f"--churn entry {entry!r}: kind must be one of {', '.join(KINDS)}"
                )
            if (kind == "tracker") != (amount is None):
                raise ConfigError(
                    f"--churn entry {entry!r}: "
                    + ("the tracker takes no amount" if kind == "tracker" else "give an amount")
                )
            if back is not None and kind in ("join", "leave"):
                raise ConfigError(f"--churn entry {entry!r}: only kill and tracker take +ROUNDS")
            value = float(amount) if amount is not None else 0.0
            percent = match["percent"] is not None
            if amount is not None and not percent and not value.is_integer():
                raise ConfigError(f"--churn entry {entry!r}: a count of peers is a whole number")
            if amount is not None and (value <= 0 or (percent and value > 100)):
                raise ConfigError(f"--churn entry {entry!r}: the amount must be in (0, 100%]")
            if int(match["round"]) < 1:
                raise ConfigError(f"--churn entry {entry!r}: rounds count from r1")
            events.append(
                ChurnEvent(
                    kind, value, percent, int(match["round"]), 1 if back is None else int(back)
                )
            )
        return cls(text, tuple(events))


@dataclass(frozen=True)
class Action:
    """One planned act: ``node`` (None for the tracker) at trigger ``round``."""

    kind: str
    node: int | None
    round: int
    back: int


@dataclass(frozen=True)
class ChurnPlan:
    """Which peer does what, and when; from :func:`plan_churn`."""

    spec: ChurnSpec
    actions: tuple[Action, ...]

    @property
    def joiners(self) -> frozenset[int]:
        """Peers not started at launch."""
        return frozenset(a.node for a in self.actions if a.kind == "join" and a.node is not None)

    @property
    def churned(self) -> frozenset[int]:
        """Every peer the plan starts late, stops or kills (each gets a process of its own)."""
        return frozenset(a.node for a in self.actions if a.node is not None)

    @property
    def restarts_tracker(self) -> bool:
        """Whether the launcher's tracker stops and starts again."""
        return any(a.kind == "tracker" for a in self.actions)


def plan_churn(
    spec: ChurnSpec, *, peers: int, rounds: int, seed: int, exclude: Sequence[int] = ()
) -> ChurnPlan:
    """Draw which peers each event picks (seeded, distinct) and check it fits the run.

    Args:
        spec: the scenario.
        peers: peers of the swarm (node 0 to ``peers - 1``).
        rounds: rounds the peers run: every trigger must come before the last one.
        seed: the draw's seed (the launcher passes the session's).
        exclude: nodes that never churn (an experiment's attackers).

    Raises:
        ConfigError: a trigger at or past the last round, or more peers picked than may churn
            (at least one peer runs from start to end untouched).
    """
    for event in spec.events:
        if event.round >= rounds:
            raise ConfigError(
                f"--churn {event.kind}@r{event.round}: the run has {rounds} rounds, so a trigger "
                f"must be r1 to r{rounds - 1}"
            )
    excluded = set(exclude)
    pool = [n for n in range(peers) if n not in excluded]
    random.Random(seed).shuffle(pool)
    wanted = sum(e.count(peers) for e in spec.events if e.kind != "tracker")
    if wanted >= len(pool):
        raise ConfigError(
            f"--churn {spec.text!r} picks {wanted} of the {len(pool)} peers that may churn; "
            "leave at least one untouched"
        )
    actions = []
    for event in spec.events:
        if event.kind == "tracker":
            actions.append(Action("tracker", None, event.round, event.back))
            continue
        for _ in range(event.count(peers)):
            actions.append(Action(event.kind, pool.pop(), event.round, event.back))
    return ChurnPlan(spec, tuple(actions))


class ChurnHost(Protocol):
    """What the driver needs from the launcher (``node.swarm.Swarm`` is one)."""

    def spawn_peer(self, index: int, extra: Sequence[str]) -> None:
        """Start peer ``index`` in a process of its own, with ``extra`` arguments."""

    def signal_peer(self, index: int, signum: int) -> bool:
        """Send ``signum`` to peer ``index``'s process; False when it is not running."""

    def stop_tracker(self) -> None:
        """Stop the launcher's tracker (its address and store are kept)."""

    def start_tracker(self) -> None:
        """Start the launcher's tracker again on the same address and store."""


class PeerProgress(Protocol):
    """What the driver reads of each peer (``node.swarm.PeerView`` is one)."""

    @property
    def index(self) -> int:
        """The node index."""

    @property
    def round(self) -> int:
        """Rounds done, from its ``status.json``."""

    @property
    def state(self) -> str:
        """What its ``status.json`` says (``running``, ``done``, ...)."""

    @property
    def alive(self) -> bool:
        """Whether its process runs."""


@dataclass
class _Pending:
    action: Action
    stage: str = "waiting"
    """``waiting`` for the trigger, ``down`` (killed or tracker stopped) until the restart,
    ``done`` or ``missed`` (the peer had exited before its trigger came)."""
    lead: int = 0
    """The leading peer's round when the action went ``down``."""


@dataclass
class ChurnDriver:
    """Carries out a :class:`ChurnPlan` as the launcher polls; logs each act to ``churn.json``.

    ``step`` is called with every peer's view after each poll: joins start when the leading peer
    reaches their round, leaves and kills fire when the peer itself has, and a killed peer or the
    tracker comes back ``back`` rounds of the leading peer later. When no peer is alive any more,
    pending restarts happen at once and joins not yet due are dropped (``missed``), so the
    launcher's wait always ends.
    """

    plan: ChurnPlan
    out: Path
    clock: Callable[[], float] = time.time
    events: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._pending = [_Pending(a) for a in self.plan.actions]
        self._write()

    @property
    def pending(self) -> bool:
        """True while an act is still to come (the launcher keeps waiting for it)."""
        return any(p.stage in ("waiting", "down") for p in self._pending)

    def step(self, host: ChurnHost, views: Sequence[PeerProgress]) -> bool:
        """Act on the views; True when something was done (the views are then out of date)."""
        by_node = {v.index: v for v in views}
        lead = max((v.round for v in views), default=0)
        anyone = any(v.alive for v in views)
        acted = False
        for item in self._pending:
            action = item.action
            view = by_node.get(action.node) if action.node is not None else None
            if item.stage == "waiting":
                if action.kind in ("join", "tracker") and not anyone:
                    item.stage = "missed"
                elif action.kind == "join" and lead >= action.round:
                    assert action.node is not None
                    host.spawn_peer(action.node, ["--join"])
                    acted = self._done(item, "joined", lead)
                elif action.kind == "tracker" and lead >= action.round:
                    host.stop_tracker()
                    item.stage, item.lead = "down", lead
                    acted = self._log("tracker_stopped", None, lead)
                elif action.kind in ("leave", "kill") and view is not None:
                    if not view.alive or view.state == "done":  # it ended before its trigger
                        item.stage = "missed"
                    elif view.round >= action.round:
                        assert action.node is not None
                        kill = action.kind == "kill"
                        if host.signal_peer(
                            action.node, signal.SIGKILL if kill else signal.SIGTERM
                        ):
                            item.stage, item.lead = ("down" if kill else "done"), lead
                            acted = self._log("killed" if kill else "left", action.node, view.round)
            elif item.stage == "down" and (lead >= item.lead + action.back or not anyone):
                if action.kind == "tracker":
                    host.start_tracker()
                    acted = self._done(item, "tracker_started", lead)
                elif view is None or not view.alive:  # the killed process is gone
                    assert action.node is not None
                    host.spawn_peer(action.node, ["--resume"])
                    acted = self._done(item, "resumed", lead)
        return acted

    def _done(self, item: _Pending, event: str, round: int) -> bool:
        item.stage = "done"
        return self._log(event, item.action.node, round)

    def _log(self, event: str, node: int | None, round: int) -> bool:
        self.events.append({"event": event, "node": node, "round": round, "time": self.clock()})
        self._write()
        return True

    def _write(self) -> None:
        write_json(
            self.out / CHURN_FILE,
            {
                "spec": self.plan.spec.text,
                "plan": [asdict(a) for a in self.plan.actions],
                "events": self.events,
                "missed": [asdict(p.action) for p in self._pending if p.stage == "missed"],
            },
        )


def churn_summary(
    out: Path, peers: list[dict[str, Any]], *, joined: Mapping[int, int | None]
) -> dict[str, Any] | None:
    """The run summary's ``churn`` part, and each peer's ``fate`` (set in ``peers`` in place).

    Args:
        out: the run folder (its ``churn.json``; None is returned without one).
        peers: the summary's per-peer results (``node``, ``state``, ``test_accuracy``).
        joined: per node, the round a ``--join`` peer says it joined at (its ``joined.json``;
            0 when it found no state and started from round 1); a node missing here gets the
            leading peer's round when it was started.

    Returns:
        The events, counts of each kind, ``survivors`` (peers that did not leave),
        ``survivors_finished``, and the mean final test accuracy of the survivors, of the
        joiners and of the others (None where nobody had one).
    """
    try:
        log = read_json(Path(out) / CHURN_FILE)
    except DataError:
        return None
    events = log.get("events") if isinstance(log, dict) else None
    if not isinstance(events, list):
        return None
    words: dict[int, list[str]] = {}
    counts = dict.fromkeys(("joined", "left", "killed", "resumed", "tracker_restarts"), 0)
    for event in events:
        kind, node, round = event.get("event"), event.get("node"), event.get("round")
        if kind == "tracker_started":
            counts["tracker_restarts"] += 1
        if kind not in ("joined", "left", "killed", "resumed") or not isinstance(node, int):
            continue
        counts[kind] += 1
        if kind == "joined":
            at = joined.get(node)
            words.setdefault(node, []).append(f"joined@r{round if at is None else at}")
        else:
            words.setdefault(node, []).append(f"{kind}@r{round}")
    leavers = {e["node"] for e in events if e.get("event") == "left"}
    for peer in peers:
        fate = words.get(peer["node"], [])
        if peer["node"] not in leavers:
            fate = [*fate, "finished" if peer["state"] == "done" else peer["state"]]
        peer["fate"] = ", ".join(fate)
    survivors = [p for p in peers if p["node"] not in leavers]
    joiners = {e["node"] for e in events if e.get("event") == "joined"}

    def mean(group: list[dict[str, Any]]) -> float | None:
        values = [p["test_accuracy"] for p in group if p.get("test_accuracy") is not None]
        return sum(values) / len(values) if values else None

    return {
        "spec": log.get("spec"),
        "events": events,
        "missed": log.get("missed", []),
        **counts,
        "survivors": len(survivors),
        "survivors_finished": sum(p["state"] == "done" for p in survivors),
        "survivor_accuracy_mean": mean(survivors),
        "joiner_accuracy_mean": mean([p for p in survivors if p["node"] in joiners]),
        "others_accuracy_mean": mean([p for p in survivors if p["node"] not in joiners]),
    }
