"""Churn scenarios: the spec parser, the seeded plan, the driver's acts and the peers' fates.

The driver is checked against a recording host and hand-made views (no processes); the launcher
with real processes is in ``test_swarm.py``, the late joiner's state in ``test_peer.py``.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedtorrent.cli import main
from fedtorrent.errors import ConfigError
from fedtorrent.metrics.records import read_json
from fedtorrent.net import wire
from fedtorrent.net.transport import Reply
from fedtorrent.node.catchup import catch_up, join_round
from fedtorrent.node.churn import (
    CHURN_FILE,
    ChurnDriver,
    ChurnEvent,
    ChurnSpec,
    churn_summary,
    plan_churn,
)
from fedtorrent.node.swarm import SwarmConfig

# -- the spec -------------------------------------------------------------------------------------


def test_a_mixed_spec_parses_into_its_events() -> None:
    spec = ChurnSpec.parse("join=10%@r5, leave=2@r8,kill=5%@r6+3,tracker@r4+0")
    assert spec.events == (
        ChurnEvent("join", 10.0, True, 5),
        ChurnEvent("leave", 2.0, False, 8),
        ChurnEvent("kill", 5.0, True, 6, back=3),
        ChurnEvent("tracker", 0.0, False, 4, back=0),
    )
    assert [e.count(24) for e in spec.events[:3]] == [2, 2, 1]  # 2.4 -> 2; 1.2 -> 1
    assert ChurnEvent("kill", 1.0, True, 2).count(6) == 1  # a percentage picks at least one


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "is not KIND=AMOUNT@rROUND"),
        ("join=10%", "is not KIND=AMOUNT@rROUND"),
        ("join=10%@5", "is not KIND=AMOUNT@rROUND"),
        ("jump=1@r2", "kind must be one of join, leave, kill, tracker"),
        ("tracker=1@r2", "the tracker takes no amount"),
        ("kill@r2", "give an amount"),
        ("join=1@r2+1", "only kill and tracker take"),
        ("leave=1.5@r2", "whole number"),
        ("leave=0@r2", "must be in"),
        ("leave=150%@r2", "must be in"),
        ("kill=1@r0", "rounds count from r1"),
    ],
)
def test_a_bad_spec_is_one_clear_line(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as caught:
        ChurnSpec.parse(text)
    assert "\n" not in str(caught.value)


def test_the_swarm_command_refuses_a_bad_spec_with_exit_status_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["fedtorrent", "swarm", str(tmp_path / "x.torrent"), "--churn", "join=1@r2+1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as caught:
        main()
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --churn entry 'join=1@r2+1'") and err.count("\n") == 1


def test_swarm_config_refuses_churn_it_cannot_carry_out(tmp_path: Path) -> None:
    base = {"torrent": tmp_path / "t", "out": tmp_path}
    with pytest.raises(ConfigError, match="--central"):
        SwarmConfig(**base, churn="leave=1@r2", central=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="own tracker"):
        SwarmConfig(**base, churn="tracker@r2", tracker="http://127.0.0.1:1/announce")  # type: ignore[arg-type]


# -- the plan -------------------------------------------------------------------------------------


def test_the_plan_is_seeded_distinct_and_spares_the_attackers() -> None:
    spec = ChurnSpec.parse("join=2@r3,leave=2@r4,kill=1@r5,tracker@r2")
    plan = plan_churn(spec, peers=8, rounds=6, seed=0, exclude=[6, 7])
    assert plan == plan_churn(spec, peers=8, rounds=6, seed=0, exclude=[6, 7])
    nodes = [a.node for a in plan.actions if a.node is not None]
    assert len(nodes) == len(set(nodes)) == 5 and not {6, 7} & set(nodes)
    assert [a.kind for a in plan.actions] == ["join", "join", "leave", "leave", "kill", "tracker"]
    assert plan.joiners == {a.node for a in plan.actions if a.kind == "join"}
    assert plan.restarts_tracker
    other = plan_churn(spec, peers=8, rounds=6, seed=1, exclude=[6, 7])
    assert other.actions != plan.actions  # another seed, another draw


def test_the_plan_refuses_late_triggers_and_too_many_peers() -> None:
    with pytest.raises(ConfigError, match="r1 to r5"):
        plan_churn(ChurnSpec.parse("leave=1@r6"), peers=4, rounds=6, seed=0)
    with pytest.raises(ConfigError, match="leave at least one untouched"):
        plan_churn(ChurnSpec.parse("join=50%@r2,kill=50%@r2"), peers=4, rounds=6, seed=0)


# -- the driver -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    index: int
    round: int
    alive: bool = True
    state: str = "running"


class Host:
    """Records what the driver asks of the launcher."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.running: set[int] = set()

    def spawn_peer(self, index: int, extra: list[str]) -> None:
        self.calls.append(("spawn", index, *extra))

    def signal_peer(self, index: int, signum: int) -> bool:
        self.calls.append(("signal", index, signum))
        return True

    def stop_tracker(self) -> None:
        self.calls.append(("tracker", "stop"))

    def start_tracker(self) -> None:
        self.calls.append(("tracker", "start"))


def test_the_driver_acts_on_rounds_and_logs_each_act(tmp_path: Path) -> None:
    spec = ChurnSpec.parse("join=1@r2,leave=1@r2,kill=1@r3+1,tracker@r2+2")
    plan = plan_churn(spec, peers=5, rounds=8, seed=0)
    node = {a.kind: a.node for a in plan.actions}
    joiner, leaver, killed = node["join"], node["leave"], node["kill"]
    others = [i for i in range(5) if i not in plan.joiners]
    driver = ChurnDriver(plan, out=tmp_path, clock=lambda: 0.0)
    host = Host()

    def views(rounds: dict[int, int], dead: frozenset[int] = frozenset()) -> list[View]:
        return [View(i, rounds.get(i, 1), alive=i not in dead) for i in others]

    assert not driver.step(host, views({}))  # everyone at round 1: nothing due
    assert driver.step(host, views({leaver: 2}))  # the leaver did round 2; the lead is at 2
    assert ("signal", leaver, signal.SIGTERM) in host.calls
    assert ("spawn", joiner, "--join") in host.calls and ("tracker", "stop") in host.calls
    host.calls.clear()
    driver.step(host, views({killed: 3}))
    assert host.calls == [("signal", killed, signal.SIGKILL)]
    host.calls.clear()
    driver.step(host, views({killed: 3, 0: 3}))  # the lead is still at 3: it stays down
    assert host.calls == []
    driver.step(host, views({killed: 3, 0: 4}, dead=frozenset({killed})))
    assert host.calls == [("spawn", killed, "--resume"), ("tracker", "start")]  # 2 + 2 = 4
    assert not driver.pending
    log = read_json(tmp_path / CHURN_FILE)
    assert [(e["event"], e["node"]) for e in log["events"]] == [
        ("joined", joiner),
        ("left", leaver),
        ("tracker_stopped", None),
        ("killed", killed),
        ("resumed", killed),
        ("tracker_started", None),
    ]


def test_when_nobody_is_left_restarts_happen_and_joins_are_missed(tmp_path: Path) -> None:
    plan = plan_churn(ChurnSpec.parse("join=1@r5,kill=1@r2+9"), peers=4, rounds=8, seed=0)
    killed = next(a.node for a in plan.actions if a.kind == "kill")
    others = [i for i in range(4) if i not in plan.joiners]
    driver, host = ChurnDriver(plan, out=tmp_path), Host()
    driver.step(host, [View(i, 2) for i in others])
    assert driver.pending
    driver.step(host, [View(i, 8 if i != killed else 2, alive=False) for i in others])
    assert host.calls[-1] == ("spawn", killed, "--resume")
    assert not driver.pending  # the join is missed: the swarm ended before round 5
    assert [a["kind"] for a in read_json(tmp_path / CHURN_FILE)["missed"]] == ["join"]


def test_a_peer_that_finished_before_its_trigger_is_left_alone(tmp_path: Path) -> None:
    plan = plan_churn(ChurnSpec.parse("leave=1@r3"), peers=3, rounds=4, seed=0)
    leaver = plan.actions[0].node
    driver, host = ChurnDriver(plan, out=tmp_path), Host()
    driver.step(host, [View(i, 4, state="done") for i in range(3)])
    assert host.calls == [] and not driver.pending
    assert leaver is not None


# -- fates ----------------------------------------------------------------------------------------


def test_fates_and_counts_come_from_the_log_and_the_peers(tmp_path: Path) -> None:
    plan = plan_churn(ChurnSpec.parse("join=1@r2,leave=1@r2,kill=1@r3"), peers=4, rounds=6, seed=0)
    node = {a.kind: a.node for a in plan.actions}
    driver, host = ChurnDriver(plan, out=tmp_path, clock=lambda: 0.0), Host()
    rest = [i for i in range(4) if i not in plan.joiners]
    driver.step(host, [View(i, 2) for i in rest])
    driver.step(host, [View(i, 3) for i in rest])
    driver.step(host, [View(i, 4, alive=i != node["kill"]) for i in rest])
    peers = [
        {"node": i, "state": "stopped" if i == node["leave"] else "done", "test_accuracy": 0.9}
        for i in range(4)
    ]
    peers[node["join"]]["test_accuracy"] = 0.8
    part = churn_summary(tmp_path, peers, joined={node["join"]: 3})
    assert part is not None
    fates = {p["node"]: p["fate"] for p in peers}
    assert fates[node["join"]] == "joined@r3, finished"
    assert fates[node["leave"]] == "left@r2"
    assert fates[node["kill"]] == "killed@r3, resumed@r4, finished"
    untouched = next(i for i in range(4) if i not in node.values())
    assert fates[untouched] == "finished"
    assert (part["joined"], part["left"], part["killed"], part["resumed"]) == (1, 1, 1, 1)
    assert part["survivors"] == 3 and part["survivors_finished"] == 3
    assert part["joiner_accuracy_mean"] == pytest.approx(0.8)
    assert part["others_accuracy_mean"] == pytest.approx(0.9)
    assert churn_summary(tmp_path / "elsewhere", peers, joined={}) is None


# -- catching up ----------------------------------------------------------------------------------


def _reply(peer: str, round: int, fill: float) -> Reply:
    header = wire.Header(kind="state", info_hash="ab" * 32, sender=peer, round=round)
    state = {"w": torch.full((4,), fill), "n": torch.tensor([round], dtype=torch.int64)}
    return Reply(peer, header, memoryview(b""), 0.0, state=state)


def test_join_round_takes_the_most_common_round_and_ties_go_high() -> None:
    assert join_round([5, 6, 6]) == 6
    assert join_round([5, 6, 7]) == 7
    assert join_round([4, 4, 9]) == 4
    assert join_round([]) == 0


def test_catch_up_averages_near_rounds_and_screens_the_far_away() -> None:
    initial = {"w": torch.zeros(4), "n": torch.tensor([0])}
    replies = {
        "a": _reply("a", 6, 1.0),
        "b": _reply("b", 6, 1.2),
        "c": _reply("c", 5, 0.8),
        "d": _reply("d", 2, 0.1),  # still catching up: left out
        "e": _reply("e", 6, 50.0),  # implausible
    }
    adopted = catch_up(replies, initial=initial, mix=["w"], exact=["n"], plausibility=10.0)
    assert adopted is not None
    assert adopted.round == 6
    assert adopted.sources == {"a": 6, "b": 6, "c": 5}
    assert set(adopted.screened) == {"e"} and adopted.left_out == {"d": 2}
    assert torch.allclose(adopted.state["w"], torch.full((4,), 1.0))
    assert adopted.state["n"].tolist() == [6]  # integer keys from the newest state
    lone = catch_up({"d": replies["d"]}, initial=initial, mix=["w"], exact=["n"], plausibility=10)
    assert lone is not None and lone.round == 2 and not lone.screened
    assert catch_up({}, initial=initial, mix=["w"], exact=["n"], plausibility=10.0) is None
