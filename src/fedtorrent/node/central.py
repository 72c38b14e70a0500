"""A real central FedAvg server over the swarm's own transport, to compare a swarm with central FL.

The server is an ordinary transport endpoint: it has its own Ed25519 identity (CurveZMQ links,
signed announces), announces to the session's tracker under the reserved peer id
:data:`CENTRAL_ID` and signs every state it publishes, like a peer. It never trains. Round ``r``:

1. **announce** (rounds done, bytes) and add every other peer the tracker lists (key and
   allow-list checked by :func:`~fedtorrent.node.exchange.select_cohort`) to its clients;
2. **gather**: pull every client's round-``r`` trained state concurrently
   (:class:`~fedtorrent.node.exchange.Fetcher`: signature, replay guard, wire checks), until all
   answered or ``exchange_timeout`` after the round began;
3. **average** the states of round ``r`` by the clients' declared ``num_examples``
   (:func:`fedavg`, the mixing code's weighted sum) and **publish** the average as the server's
   round-``r`` state; with no client heard the previous average is published again;
4. **record** one line in ``metrics.jsonl`` (clients heard, weights, bytes, wall time) and
   rewrite ``status.json``; the ledger gets a ``received`` entry per state averaged and a
   ``sent`` entry per state served.

Clients are peers started with ``--central`` (``PeerConfig.central``): each round they train and
publish as usual, then fetch the server's state of their round and adopt it. Both ends run their
transport with ``serve_older=False``, so a poll that comes too early is refused with a header
(``not_ready``) and never answered with a stale payload: every payload byte the server moves is
one upload or one download of FedAvg. The bytes are the transport's own counts
(:class:`~fedtorrent.net.transport.TrafficStats`), written to ``summary.json``.

Nothing starts in the constructor: ``start`` loads and binds, ``run`` runs the rounds, ``close``
says goodbye to the tracker and writes ``summary.json``; ``request_stop`` ends ``run`` early.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import torch

from fedtorrent.errors import ConfigError
from fedtorrent.ledger import Ledger
from fedtorrent.metrics.records import write_json
from fedtorrent.mixing.round import mix_exact
from fedtorrent.mixing.rules import mix
from fedtorrent.net.identity import (
    PeerIdentity,
    curve_public_key,
    signed_state,
)
from fedtorrent.net.torrent import Session
from fedtorrent.net.tracker.client import TrackerAnswer, TrackerClient
from fedtorrent.net.transport import Endpoint, ServedEvent, Transport, TransportConfig, ZmqTransport
from fedtorrent.node.exchange import (
    POLL_FIRST_S,
    POLL_MAX_S,
    Addressing,
    Announcer,
    Exchange,
    Fetcher,
    TcpAddressing,
    select_cohort,
)
from fedtorrent.node.hello import Introductions, introduce
from fedtorrent.node.joining import join
from fedtorrent.node.neighbours import NeighbourBook
from fedtorrent.node.report import (
    PeerSnapshot,
    log_mixed,
    log_served,
    open_ledger,
    open_records,
    summary,
    traffic_totals,
    write_status,
)
from fedtorrent.node.tracking import TrackerLink
from fedtorrent.state import encode_state, flatten, unflatten
from fedtorrent.state.layout import StateLayout, pick

__all__ = ["CENTRAL_ID", "CentralServer", "ServerConfig", "fedavg", "server_layout"]

log = logging.getLogger(__name__)
State = dict[str, torch.Tensor]
CENTRAL_ID = "server"
"""The peer id the central server announces under; ``--central`` clients fetch from it only."""
QUIET_S = 0.5
"""After its last round the server serves until every client heard has fetched the final state
and nobody asked for this long (as a peer lingers, ``node.peer``)."""
NUMWANT = 200
"""Peers asked of the tracker per announce: its default maximum."""


def fedavg(
    states: Sequence[Mapping[str, torch.Tensor]],
    num_examples: Sequence[int],
    layout: StateLayout,
) -> tuple[State, torch.Tensor]:
    """FedAvg: the clients' states averaged with weights ``n_i / sum(n)``.

    ``mix`` keys go through :func:`fedtorrent.mixing.rules.mix` on float32 vectors (as every
    weighted rule does); ``exact`` keys through :func:`fedtorrent.mixing.round.mix_exact` (the
    weighted mean rounded, in float64). When every count is 0 the weights are uniform.

    Args:
        states: one state per client, each holding the layout's ``shared`` keys.
        num_examples: each client's training examples (the header's ``num_examples``), >= 0.
        layout: which keys are mixed and which combined exactly.

    Returns:
        The average (the ``shared`` keys, dtypes as in ``states[0]``) and the ``(M,)`` float32
        weights used.

    Raises:
        ConfigError: no states, or counts that do not match them.
    """
    if not states or len(states) != len(num_examples) or min(num_examples) < 0:
        raise ConfigError(
            f"fedavg needs one count >= 0 per state: {len(states)} states, {list(num_examples)}"
        )
    counts = torch.tensor([float(n) for n in num_examples], dtype=torch.float64)
    total = float(counts.sum())
    weights = counts / total if total > 0 else torch.full_like(counts, 1.0 / len(states))
    row = weights.to(torch.float32).unsqueeze(0)
    averaged: State = {}
    if layout.mix:
        stack = torch.stack([flatten(pick(state, layout.mix)) for state in states])
        averaged = unflatten(mix(row, stack)[0], pick(states[0], layout.mix))
    self_column = torch.zeros(1, dtype=torch.long)
    for key in layout.exact:
        values = torch.stack([state[key] for state in states])
        averaged[key] = mix_exact(values, weights=row, self_column=self_column)[0]
    return averaged, row[0]


def server_layout(session: Session, initial: Mapping[str, torch.Tensor]) -> StateLayout:
    """How the server combines each key of the session's state.

    A task session carries its schema. A built-in model has parameters only, so its layout is
    that of the ``average`` buffer policy on the initial state (what ``state_schema`` gives it):
    floating keys mixed, integer and bool keys combined exactly, nothing local.
    """
    if session.task is not None:
        return StateLayout.from_schema(session.task.schema)
    floating = tuple(sorted(k for k, v in initial.items() if v.is_floating_point()))
    exact = tuple(sorted(k for k in initial if k not in floating))
    return StateLayout(mix=floating, exact=exact, local=(), parameters=floating)


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``fedtorrent server`` is told on its command line; validated on construction."""

    torrent: Path
    out_dir: Path
    clients: int
    """How many clients the first round waits to see listed (``join_timeout`` at most)."""
    state_path: Path | None = None
    """The torrent's initial state; default beside the torrent (``state_path_for``)."""
    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port."""
    advertise_ip: str | None = None
    """The address clients should dial (sent to the tracker); default: what the tracker sees."""
    tracker: str | None = None
    """Tracker URL; default the torrent's ``announce``."""
    exchange_timeout: float = 60.0
    """Seconds a round waits for the clients' states at most, from the start of the server's
    round: it covers a client's whole round (fetching the average, evaluating, training)."""
    join_timeout: float = 60.0
    """Seconds the first round waits for ``clients`` peers to be listed at the tracker."""
    rounds: int | None = None
    """Override the torrent's round count."""
    key_dir: Path | None = None
    """The server's Ed25519 identity (created on first use); default ``<out>/keys``."""
    tracker_timeout: float = 3.0
    tracker_retries: int = 1
    linger: float | None = None
    """Seconds to keep serving the final average at most; default ``exchange_timeout``."""

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ConfigError(f"clients must be >= 1, got {self.clients}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        for name in ("exchange_timeout", "join_timeout", "tracker_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {value}")
        if self.linger is not None and not (math.isfinite(self.linger) and self.linger >= 0):
            raise ConfigError(f"linger must be a finite number >= 0, got {self.linger}")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.tracker_retries < 0:
            raise ConfigError(f"tracker retries must be >= 0, got {self.tracker_retries}")


class CentralServer:
    """The central FedAvg server; see the module docstring for a round.

    Args:
        config: the command line.
        transport: builds the transport (not started) from its settings; default a
            ``ZmqTransport`` bound to ``tcp://host:port``.
        tracker: the tracker (anything with ``TrackerClient.announce``'s signature); default a
            signed ``TrackerClient`` for ``config.tracker`` or the torrent's ``announce``.
        addressing: how addresses map to announces and endpoints; default TCP.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        transport: Callable[[TransportConfig], Transport] | None = None,
        tracker: Announcer | None = None,
        addressing: Addressing | None = None,
    ) -> None:
        self.config = config
        self._make_transport = transport
        self.tracker = TrackerLink(tracker)
        self.addressing: Addressing = addressing or TcpAddressing()
        self._stop = threading.Event()
        self._started = self._closed = False
        self.state = "starting"
        self.error: str | None = None
        self.round_done = 0
        self.records: list[dict[str, Any]] = []
        self.clients: dict[str, Endpoint] = {}
        """Every client listed so far, by peer id (a client the tracker stops listing stays)."""
        self._keys: dict[str, str] = {}
        self._skipped: dict[str, str] = {}
        self.hellos: Introductions | None = None
        """Clients a BitTorrent tracker listed by address, resolved by hello (``node.hello``)."""
        self._served: queue.SimpleQueue[ServedEvent] = queue.SimpleQueue()
        self._executor: ThreadPoolExecutor | None = None
        self._final = Exchange()
        self._counted: dict[str, int] = {}
        self.ledger: Ledger | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Load and verify the torrent and its state, bind, announce ``started``.

        Raises:
            TorrentError: the torrent or its initial state does not verify.
            NetworkError: the port cannot be bound.
        """
        if self._started:
            raise ConfigError("server already started")
        self._started = True
        self.out_dir = Path(self.config.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException as exc:
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            write_status(self.snapshot())
            raise

    def _start(self) -> None:
        cfg = self.config
        joined = join(
            cfg.torrent, state_path=cfg.state_path, key_dir=cfg.key_dir or self.out_dir / "keys",
            rounds=cfg.rounds, role="the server's",
        )  # fmt: skip
        self.torrent, self.session = joined.torrent, joined.session
        self.info_hash = self.torrent.info_hash
        self.identity, self.rounds, self.verifier = joined.identity, joined.rounds, joined.verifier
        initial = joined.initial
        self.layout = server_layout(self.session, initial)
        self.like = pick(initial, self.layout.shared)
        self.current: State = {k: v.clone() for k, v in self.like.items()}
        self._writer, self.records = open_records(self.out_dir, resume=False, round_done=0)
        self.ledger = open_ledger(
            self.out_dir, self.identity, peer_id=CENTRAL_ID, info_hash=self.info_hash, resume=False
        )
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        allowed = self.session.allow_keys
        transport_config = TransportConfig(
            info_hash=self.info_hash,
            peer_id=CENTRAL_ID,
            bind=f"tcp://{host}:{cfg.port}",
            max_payload_bytes=2 * self.session.state_size + (64 << 10),
            max_concurrent_fetches=max(1, min(64, cfg.clients)),
            curve_secret_key=self.identity.curve_secret,
            curve_public_key=self.identity.curve_public,
            curve_allow=frozenset(curve_public_key(k) for k in allowed) if allowed else None,
            serve_older=False,  # a client asking for round r before it is averaged: not_ready
        )
        if self._make_transport is None:
            self.transport: Transport = ZmqTransport(transport_config)
        else:
            self.transport = self._make_transport(transport_config)
        self.transport.on_served = self._served.put
        if self.tracker.announcer is None:
            self.tracker.announcer = TrackerClient(
                cfg.tracker or self.torrent.announce,
                timeout=cfg.tracker_timeout,
                retries=cfg.tracker_retries,
                backoff=0.2,
                max_backoff=1.0,
                identity=self.identity,
            )
        self.transport.start()
        self._executor = ThreadPoolExecutor(
            max(1, min(64, cfg.clients)), thread_name_prefix="fedtorrent-gather"
        )
        self._fetcher = Fetcher(
            transport=self.transport,
            executor=self._executor,
            like=self.like,
            verifier=self.verifier,
            keys=self._keys,
            stop=self._stop,
        )
        self.address = self.transport.address
        self.port = self.addressing.port_of(self.address)
        self.hellos = introduce(
            self.transport, self.identity, info_hash=self.info_hash, peer_id=CENTRAL_ID,
            port=self.port,
        )  # fmt: skip
        log.info("central server of session %s listening on %s for %d clients, %d rounds",
                 self.info_hash[:16], self.address, cfg.clients, self.rounds)  # fmt: skip
        write_status(self.snapshot())
        self._announce(event="started")

    def run(self) -> str:
        """Wait for the clients, run every round, serve the final average; the final state name."""
        if not self._started or self._closed:
            raise ConfigError("start the server before running it")
        self.state = "running"
        write_status(self.snapshot())
        try:
            self._await_clients()
            while self.round_done < self.rounds and not self._stop.is_set():
                self.run_round(self.round_done + 1)
            if self.round_done >= self.rounds:
                self.state = "done"
                self._announce(event="completed")
                self._linger()
            else:
                self.state = "stopped"
        except BaseException as exc:
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            write_status(self.snapshot())
        return self.state

    def request_stop(self) -> None:
        """Ask ``run`` to return at the next phase boundary (safe from a signal handler)."""
        self._stop.set()

    def close(self) -> None:
        """Announce ``stopped``, stop serving, write ``summary.json``; safe to call twice."""
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        self._stop.set()
        if self.state in ("starting", "running"):
            self.state = "stopped"
        if hasattr(self, "transport"):
            if hasattr(self, "port"):
                self._announce(event="stopped")
            self.transport.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        if self.ledger is not None:
            log_served(self.ledger, self._served)
            self.ledger.close()
        if hasattr(self, "_writer"):
            self._writer.close()
            if hasattr(self, "transport"):
                write_json(self.out_dir / "summary.json", self.summary())
        write_status(self.snapshot())

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- one round --------------------------------------------------------------------------

    def run_round(self, round: int) -> dict[str, Any] | None:
        """Announce, gather, average, publish, record: one round.

        Returns the round's record, or None when a stop request cut the gathering short.
        """
        began = time.perf_counter()
        timings: dict[str, float] = {}
        deadline = time.monotonic() + self.config.exchange_timeout
        answer, tracker_rtt, tracker_status = self._announce(event="")
        self._add_clients(answer)
        exchange = self._fetcher.exchange(
            list(self.clients.values()), round=round, deadline=deadline, skipped=self._skipped
        )
        timings["gather"] = time.perf_counter() - began
        if self._stop.is_set():
            return None
        tick = time.perf_counter()
        heard = [
            p for p in exchange.dialled
            if p in exchange.replies and exchange.replies[p].state is not None
            and exchange.replies[p].header.round == round
        ]  # fmt: skip
        counts = [exchange.replies[p].header.num_examples for p in heard]
        weights = torch.zeros(0)
        if heard:
            states = [exchange.replies[p].state for p in heard]
            self.current, weights = fedavg([s for s in states if s is not None], counts,
                                           self.layout)  # fmt: skip
        else:
            log.warning("round %d: no client's state came; publishing the last average", round)
        timings["average"] = time.perf_counter() - tick
        tick = time.perf_counter()
        self._publish(round, num_examples=sum(counts))
        timings["publish"] = time.perf_counter() - tick
        assert self.ledger is not None
        log_served(self.ledger, self._served)
        # log_mixed reads weights over [self, *heard]: the server's own row weighs nothing.
        log_mixed(self.ledger, heard, exchange, torch.cat([torch.zeros(1), weights]))
        self._final = exchange
        self.round_done = round
        record = {
            "round": round,
            "peer_id": CENTRAL_ID,
            "role": "server",
            "cohort": exchange.dialled,
            "cohort_size": len(exchange.dialled),
            "heard_from": heard,
            "heard": len(heard),
            "num_examples": dict(zip(heard, counts, strict=True)),
            "weights": dict(zip(heard, weights.tolist(), strict=True)),
            "off_round": {p: r.header.round for p, r in exchange.replies.items() if p not in heard},
            "rejected_from": exchange.rejected,
            "missing": exchange.missing,
            "skipped": exchange.skipped,
            **self._bytes_since_last_record(),
            "tracker": tracker_status,
            "tracker_rtt_s": tracker_rtt,
            "timings": timings,
            "duration_s": time.perf_counter() - began,
        }
        self.records.append(record)
        self._writer.write(record)
        write_status(self.snapshot())
        log.info("round %d: averaged %d/%d clients, %.2fs", round, len(heard),
                 len(exchange.dialled), record["duration_s"])  # fmt: skip
        return record

    def _bytes_since_last_record(self) -> dict[str, Any]:
        """The transport's byte counts since the previous record (all rounds' traffic).

        The record of round ``r`` counts what moved after round ``r - 1`` was published: the
        clients' downloads of that average and their uploads of round ``r``. The downloads of
        the last average come after the last record and are in ``summary.json``'s totals.
        """
        totals = dict(self.transport.stats.snapshot()["totals"])
        delta = {k: int(v) - self._counted.get(k, 0) for k, v in totals.items()}
        self._counted = {k: int(v) for k, v in totals.items()}
        return {
            "bytes_sent": delta["header_sent"] + delta["payload_sent"],
            "bytes_received": delta["header_received"] + delta["payload_received"],
            "header_bytes_sent": delta["header_sent"],
            "payload_bytes_sent": delta["payload_sent"],
            "header_bytes_received": delta["header_received"],
            "payload_bytes_received": delta["payload_received"],
        }

    def _publish(self, round: int, *, num_examples: int) -> None:
        """Serve the current average as the server's round-``round`` state, signed once."""
        self.transport.publish(
            signed_state(
                self.identity, encode_state(self.current), info_hash=self.info_hash,
                sender=CENTRAL_ID, round=round, num_examples=num_examples,
            )
        )  # fmt: skip

    # -- clients and the tracker ------------------------------------------------------------

    def _announce(self, *, event: str) -> tuple[TrackerAnswer | None, float | None, str]:
        totals = traffic_totals(self.snapshot())
        return self.tracker.announce(
            self.info_hash,
            CENTRAL_ID,
            event=event,
            round=self.round_done,
            port=self.port,
            numwant=NUMWANT,
            bytes_sent=totals["bytes_sent"],
            bytes_received=totals["bytes_received"],
            pubkey=self.identity.public_key_hex,
            ip=self.config.advertise_ip,
            hello_port=self.transport.hello_port,
        )

    def _add_clients(self, answer: TrackerAnswer | None) -> None:
        """Every peer ``answer`` lists that may be dialled becomes (or stays) a client."""
        if answer is None:
            return
        listed = answer.peers if self.hellos is None else self.hellos.listed(answer)
        selection = select_cohort(
            listed,
            peer_id=CENTRAL_ID,
            cohort_size=max(1, len(listed)),
            allowed=self.session.allow_keys,
            addressing=self.addressing,
            book=NeighbourBook(),  # no backoff: FedAvg asks every client every round
            round=self.round_done + 1,
        )
        self._keys.update(selection.keys)
        self._skipped = selection.skipped
        for endpoint in selection.cohort + selection.reserve:
            self.clients[endpoint.peer_id] = endpoint

    def _await_clients(self) -> None:
        """Re-announce until ``clients`` peers are listed, at most ``join_timeout`` seconds."""
        deadline = time.monotonic() + self.config.join_timeout
        delay = POLL_FIRST_S
        while len(self.clients) < self.config.clients and not self._stop.is_set():
            answer, _, _ = self._announce(event="")
            self._add_clients(answer)
            remaining = deadline - time.monotonic()
            if len(self.clients) >= self.config.clients or remaining <= 0:
                break
            self._stop.wait(min(delay, remaining))
            delay = min(2 * delay, POLL_MAX_S)
        if len(self.clients) < self.config.clients:
            log.warning(
                "%d of %d clients listed after %.0f s; starting with them",
                len(self.clients),
                self.config.clients,
                self.config.join_timeout,
            )

    def _linger(self) -> None:
        """Serve the final average until every client heard last round has fetched it.

        Ends once those clients have all fetched it and nobody asked for ``QUIET_S``, or after
        ``linger`` (default ``exchange_timeout``) seconds.
        """
        limit = self.config.exchange_timeout if self.config.linger is None else self.config.linger
        final = self.round_done
        waiting = {p for p in self._final.replies if self._final.replies[p].header.round == final}
        start = time.monotonic()
        deadline, quiet_since, seen = start + limit, start, -1
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= deadline:
                break
            flows = [f for f in self.transport.stats.snapshot()["per_peer_round"]
                     if f["round"] == final]  # fmt: skip
            requests = sum(f["messages_received"] for f in flows)
            if requests != seen:
                seen, quiet_since = requests, now
            waiting -= {f["peer"] for f in flows if f["payload_sent"]}
            if not waiting and now - quiet_since >= QUIET_S:
                break
            self._stop.wait(min(POLL_MAX_S / 5, max(0.0, deadline - now)))
        assert self.ledger is not None
        log_served(self.ledger, self._served)

    # -- reports ----------------------------------------------------------------------------

    def snapshot(self) -> PeerSnapshot:
        """What ``status.json`` and ``summary.json`` read of the server now, as plain values."""
        transport: Transport | None = getattr(self, "transport", None)
        identity: PeerIdentity | None = getattr(self, "identity", None)
        return PeerSnapshot(
            out_dir=getattr(self, "out_dir", None),
            peer_id=CENTRAL_ID,
            state=self.state,
            error=self.error,
            round_done=self.round_done,
            records=tuple(self.records),
            rounds=getattr(self, "rounds", None),
            address=getattr(self, "address", None),
            traffic=transport.stats.snapshot() if transport is not None else None,
            rejections=transport.stats.rejections() if transport is not None else {},
            tracker_online=self.tracker.online,
            tracker_counts=dict(self.tracker.counts),
            tracker_rtts=tuple(self.tracker.rtts),
            info_hash=getattr(self, "info_hash", None),
            session=getattr(self, "session", None),
            public_key=identity.public_key_hex if identity is not None else None,
            ledger=self.ledger.path.name if self.ledger is not None else None,
        )

    def summary(self) -> dict[str, Any]:
        """``summary.json``: a peer's summary (``node.report.summary``) with the server's part.

        ``traffic`` holds the bytes the server's transport counted (headers and payloads, every
        request, reply and refusal) and ``central_server_bytes``, the formula for the same run
        (``2 x state x`` client-rounds averaged); ``server`` the clients, and per round how
        many were heard.
        """
        part = summary(self.snapshot(), test=None)
        heard = sum(r["heard"] for r in self.records)  # the formula for the uploads averaged
        part["traffic"]["central_server_bytes"] = 2 * self.session.state_size * heard
        part["role"] = "server"
        part["mixing"] = "fedavg"
        part["server"] = {
            "clients": self.config.clients,
            "clients_known": sorted(self.clients),
            "heard_per_round": [r["heard"] for r in self.records],
            "state_bytes": self.session.state_size,
        }
        return part
