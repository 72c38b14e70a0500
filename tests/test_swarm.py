"""The swarm launcher: real peer processes, a real tracker, stopping on signals, the summary files.

The fast tests drive the launcher with a stand-in peer (a short Python script that writes the same
files as ``fedtorrent peer``), so launcher logic is checked in seconds; the slow ones run real
``fedtorrent peer`` processes on MNIST and compare the swarm's accuracy with the simulator's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fedtorrent.errors import ConfigError
from fedtorrent.metrics.records import read_json, read_records
from fedtorrent.node.swarm import (
    SwarmConfig,
    bandwidth,
    peer_folder,
    run_swarm,
    swarm_faults,
    swarm_neighbours,
    view_of,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FEDTORRENT_DATA", "/work/shared/data"))

FAKE_PEER = textwrap.dedent(
    """
    import argparse, json, os, signal, sys, time
    parser = argparse.ArgumentParser()
    parser.add_argument("torrent")
    parser.add_argument("--out", required=True)
    parser.add_argument("--node-index", type=int, required=True)
    parser.add_argument("--num-nodes", type=int, required=True)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--tracker")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir")
    parser.add_argument("--exchange-timeout", type=float)
    parser.add_argument("--round-seconds", type=float, default=0.05)
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--fail-at", type=int, default=-1)
    parser.add_argument("--join", action="store_true")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    stopping = []
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *a: stopping.append(1))
    peer_id = f"fake{args.node_index:04d}"
    sent = received = 0

    def status(state, round_):
        path = os.path.join(args.out, "status.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"peer_id": peer_id, "round": round_, "rounds": args.rounds,
                       "accuracy": 0.5 + 0.01 * round_ + 0.001 * args.node_index,
                       "bytes_sent": sent, "bytes_received": received, "state": state}, f)
        os.replace(path + ".tmp", path)

    status("starting", 0)
    done = 0
    if args.resume and os.path.exists(os.path.join(args.out, "metrics.jsonl")):
        with open(os.path.join(args.out, "metrics.jsonl")) as f:
            done = sum(1 for line in f if line.strip())
    with open(os.path.join(args.out, "metrics.jsonl"), "a") as metrics:
        for r in range(done + 1, args.rounds + 1):
            if stopping:
                status("stopped", r - 1)
                sys.exit(0)
            if r == args.fail_at:
                print("boom", file=sys.stderr)
                sys.exit(3)
            time.sleep(args.round_seconds)
            sent += 1000
            received += 900
            metrics.write(json.dumps({"round": r, "peer_id": peer_id,
                                      "test_accuracy": 0.5 + 0.01 * r + 0.001 * args.node_index,
                                      "bytes_sent": 1000, "bytes_received": 900}) + "\\n")
            metrics.flush()
            status("running", r)
    status("done", args.rounds)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"peer_id": peer_id, "rounds": args.rounds}, f)
    """
)


@pytest.fixture(scope="module")
def digits_torrent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small torrent (digits, logistic regression) made by ``fedtorrent create``."""
    folder = tmp_path_factory.mktemp("torrent")
    return _create(folder / "digits.torrent", dataset="digits", rounds=3, nodes=6)


def _create(path: Path, *, dataset: str, rounds: int, nodes: int, **extra: object) -> Path:
    from fedtorrent.cli.net import create

    create(output=path, dataset=dataset, model="logreg", nodes=nodes, rounds=rounds, **extra)  # type: ignore[arg-type]
    return path


def _fake_config(tmp_path: Path, torrent: Path, *extra: str, peers: int = 3) -> SwarmConfig:
    script = tmp_path / "fake_peer.py"
    script.write_text(FAKE_PEER)
    return SwarmConfig(
        torrent=torrent,
        out=tmp_path / "run",
        peers=peers,
        peer_command=(sys.executable, str(script)),
        peer_args=tuple(extra),
        stop_grace=2.0,
    )


def test_config_rejects_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="peers"):
        SwarmConfig(torrent=tmp_path / "t", out=tmp_path, peers=0)
    with pytest.raises(ConfigError, match="port_base"):
        SwarmConfig(torrent=tmp_path / "t", out=tmp_path, peers=10, port_base=65530)
    with pytest.raises(ConfigError, match="tracker"):
        SwarmConfig(torrent=tmp_path / "t", out=tmp_path, tracker="udp://x:1")


def test_bandwidth_prices_a_central_server_per_completed_peer_round() -> None:
    band = bandwidth(
        state_bytes=1000,
        peer_rounds=[3, 3, 2],
        tracker_bytes_in=400,
        tracker_bytes_out=600,
        p2p_bytes_sent=5000,
        p2p_bytes_received=4000,
    )
    assert band["central_server_bytes"] == 2 * 1000 * 8
    assert band["tracker_bytes"] == 1000
    assert band["tracker_vs_central"] == pytest.approx(1000 / 16000)
    unknown = bandwidth(
        state_bytes=1000,
        peer_rounds=[],
        tracker_bytes_in=None,
        tracker_bytes_out=5,
        p2p_bytes_sent=0,
        p2p_bytes_received=0,
    )
    assert unknown["tracker_bytes"] is None and unknown["tracker_vs_central"] is None


def test_swarm_neighbours_sums_skips_and_bytes_saved_over_peers(tmp_path: Path) -> None:
    parts = [
        {"candidates_skipped": {"low_trust": 5, "backed_off": 1}, "bytes_saved": 700},
        {"candidates_skipped": {"low_trust": 2}, "bytes_saved": 300, "heard_distinct": 2},
    ]
    folders = [tmp_path / f"p{i}" for i in range(3)]  # the last one wrote no summary
    for i, part in enumerate(parts):
        folders[i].mkdir()
        text = json.dumps({"peer_id": f"peer-{i}", "neighbours": part})
        (folders[i] / "summary.json").write_text(text)
    totals = swarm_neighbours(folders)
    assert totals["candidates_skipped"] == {"low_trust": 7, "backed_off": 1}
    assert totals["skipped"] == 8 and totals["bytes_saved"] == 1000
    assert totals["heard_distinct"] == {"peer-1": 2}


def test_swarm_faults_sums_retries_failed_requests_and_time_lost_over_rounds() -> None:
    records = {
        0: [
            {"retries": 2, "failed": {"timeout": 1}, "time_lost_s": 4.5},
            {"retries": 1, "failed": {"timeout": 1, "refused:not_ready": 3}, "time_lost_s": 0.5},
        ],
        1: [{"retries": 0, "failed": {}, "time_lost_s": 0.0}, {"round": 2}],  # an older record
    }
    faults = swarm_faults(records)
    assert faults["retries"] == 3 and faults["time_lost_s"] == 5.0
    assert faults["failed"] == {"timeout": 2, "refused:not_ready": 3}
    assert faults["per_peer"]["0"]["worst_round_lost_s"] == 4.5
    assert faults["per_peer"]["1"] == {
        "retries": 0, "failed": {}, "time_lost_s": 0.0, "worst_round_lost_s": 0.0,
    }  # fmt: skip


def test_view_marks_a_peer_that_died_without_saying_so_as_failed() -> None:
    running = {"state": "running", "round": 2, "rounds": 5, "accuracy": 0.9, "bytes_sent": 10}
    assert view_of(0, pid=1, returncode=None, status=running).state == "running"
    assert view_of(0, pid=1, returncode=-9, status=running).state == "failed"
    assert view_of(0, pid=1, returncode=0, status=None).state == "exited"
    done = view_of(0, pid=1, returncode=0, status={**running, "state": "done"})
    assert done.state == "done" and done.round == 2 and done.bytes_sent == 10
    junk = view_of(0, pid=1, returncode=None, status={"state": 3, "round": "x", "accuracy": True})
    assert junk.state == "starting" and junk.round == 0 and junk.accuracy is None


@pytest.mark.network
@pytest.mark.timeout(60)
def test_run_swarm_shows_rounds_done_across_peers_on_a_terminal(
    tmp_path: Path,
    digits_torrent: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich draws as on a terminal
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    config = _fake_config(tmp_path, digits_torrent, "--rounds", "3", peers=3)
    summary = run_swarm(config, timeout=45, plots=False)
    assert summary["finished"] == 3
    assert "9/9" in capfd.readouterr().err  # 3 peers x 3 rounds, on stderr


@pytest.mark.network
@pytest.mark.timeout(60)
def test_fake_swarm_runs_to_the_end_and_writes_the_summary(
    tmp_path: Path, digits_torrent: Path
) -> None:
    config = _fake_config(tmp_path, digits_torrent, "--rounds", "3", peers=3)
    updates: list[int] = []
    summary = run_swarm(config, on_update=lambda views: updates.append(len(views)), timeout=45)
    assert updates and set(updates) == {3}
    assert summary["finished"] == 3 and not summary["interrupted"]
    assert [p["rounds_completed"] for p in summary["per_peer"]] == [3, 3, 3]
    assert summary["test_accuracy_mean"] == pytest.approx(0.53 + 0.001, abs=1e-9)
    band = summary["bandwidth"]
    assert band["p2p_bytes_sent"] == 9000 and band["p2p_bytes_received"] == 8100
    state_size = (digits_torrent.with_suffix(".state")).stat().st_size
    assert band["central_server_bytes"] == 2 * 3 * 3 * state_size
    # The fake peers never announce, so the launcher's own tracker has seen nothing of them.
    assert band["tracker_bytes"] is None
    assert read_json(config.out / "summary.json") == json.loads(json.dumps(summary))
    assert len(read_records(config.out / "rounds.jsonl")) == 9
    for name in ("accuracy.png", "bytes.png", "bandwidth.png"):
        assert (config.out / "plots" / name).stat().st_size > 1000
    launch = read_json(config.out / "swarm.json")
    assert launch["tracker_owned"] and launch["tracker"].endswith("/announce")
    command = launch["peers"][1]["command"]
    assert command[command.index("--node-index") + 1] == "1"
    assert command[command.index("--num-nodes") + 1] == "6"
    with pytest.raises(ConfigError, match="already holds the records"):
        run_swarm(config, timeout=10)


@pytest.mark.network
@pytest.mark.timeout(60)
def test_stop_kills_peers_that_ignore_sigterm_after_the_grace(
    tmp_path: Path, digits_torrent: Path
) -> None:
    config = _fake_config(
        tmp_path, digits_torrent, "--rounds", "100000", "--round-seconds", "0.05", "--ignore-term"
    )
    stop = threading.Event()

    def stop_when_running(views: list) -> None:
        if all(v.round >= 1 for v in views):
            stop.set()

    started = time.monotonic()
    summary = run_swarm(config, stop=stop, on_update=stop_when_running, timeout=40)
    assert time.monotonic() - started < 30
    assert summary["interrupted"]
    assert {p["exit_code"] for p in summary["per_peer"]} == {-signal.SIGKILL}
    assert {p["state"] for p in summary["per_peer"]} == {"failed"}


@pytest.mark.network
@pytest.mark.timeout(60)
def test_a_failing_peer_is_reported_and_the_others_finish(
    tmp_path: Path, digits_torrent: Path
) -> None:
    script = tmp_path / "fake_peer.py"
    script.write_text(FAKE_PEER)
    # Peer 1 fails at round 2: a wrapper picks the failure by node index.
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(
        "import subprocess, sys\n"
        "args = sys.argv[1:]\n"
        "extra = ['--fail-at', '2'] if args[args.index('--node-index') + 1] == '1' else []\n"
        f"sys.exit(subprocess.call([sys.executable, {str(script)!r}, *args, *extra]))\n"
    )
    config = SwarmConfig(
        torrent=digits_torrent,
        out=tmp_path / "run",
        peers=3,
        peer_command=(sys.executable, str(wrapper)),
        peer_args=("--rounds", "3"),
        stop_grace=2.0,
    )
    summary = run_swarm(config, timeout=45, plots=False)
    states = [p["state"] for p in summary["per_peer"]]
    assert states == ["done", "failed", "done"]
    assert summary["per_peer"][1]["exit_code"] == 3
    assert summary["per_peer"][1]["rounds_completed"] == 1
    assert "boom" in (peer_folder(config.out, 1) / "console.log").read_text()


@pytest.mark.network
@pytest.mark.timeout(90)
def test_churn_starts_joiners_late_stops_leavers_and_resumes_the_killed(
    tmp_path: Path, digits_torrent: Path
) -> None:
    config = dataclasses.replace(
        _fake_config(tmp_path, digits_torrent, "--round-seconds", "0.4", peers=5),
        rounds=8,
        churn="join=1@r2,leave=1@r3,kill=1@r3+1",
    )
    summary = run_swarm(config, timeout=75, plots=False)
    churn = summary["churn"]
    assert (churn["joined"], churn["left"], churn["killed"], churn["resumed"]) == (1, 1, 1, 1)
    assert churn["survivors"] == 4 and churn["survivors_finished"] == 4
    fates = {p["node"]: p["fate"] for p in summary["per_peer"]}
    plan = {a["kind"]: a["node"] for a in read_json(config.out / "churn.json")["plan"]}
    assert fates[plan["join"]].startswith("joined@r") and fates[plan["join"]].endswith("finished")
    assert re.fullmatch(r"left@r[34]", fates[plan["leave"]])
    assert re.fullmatch(r"killed@r[34], resumed@r[4-7], finished", fates[plan["kill"]])
    states = {p["node"]: p["state"] for p in summary["per_peer"]}
    assert states[plan["leave"]] == "stopped" and list(states.values()).count("done") == 4
    by_node = {p["node"]: p for p in summary["per_peer"]}
    assert by_node[plan["kill"]]["rounds_completed"] == 8  # it went on from where it was killed
    assert by_node[plan["kill"]]["exit_code"] == 0  # the resumed process's
    assert by_node[plan["leave"]]["rounds_completed"] < 8
    launched = [p["index"] for p in read_json(config.out / "swarm.json")["peers"]]
    assert plan["join"] not in launched and len(launched) == 4


# --- real peers ----------------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from fedtorrent.cli import main; main()", *args]


def _wait_for_rounds(out: Path, peers: int, *, at_least: int, timeout: float) -> None:
    """Poll the peers' status files until each has finished ``at_least`` rounds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rounds = []
        for i in range(peers):
            path = peer_folder(out, i) / "status.json"
            try:
                rounds.append(json.loads(path.read_text())["round"])
            except (OSError, ValueError, KeyError):
                rounds.append(-1)
        if min(rounds) >= at_least:
            return
        time.sleep(0.2)
    pytest.fail(f"peers did not all reach round {at_least} within {timeout} s: {rounds}")


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_swarm_command_stops_every_peer_on_sigint(tmp_path: Path, digits_torrent: Path) -> None:
    """Ctrl-C on ``fedtorrent swarm``: peers stop cleanly, the summary is still written."""
    out = tmp_path / "run"
    process = subprocess.Popen(
        _cli(
            "swarm", str(digits_torrent), "--peers", "3", "--out", str(out), "--no-live",
            "--no-plots", "--rounds", "10000", "--exchange-timeout", "5",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        _wait_for_rounds(out, 3, at_least=1, timeout=90)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=45)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, output
    summary = read_json(out / "summary.json")
    assert summary["interrupted"]
    assert {p["state"] for p in summary["per_peer"]} == {"stopped"}, output
    assert {p["exit_code"] for p in summary["per_peer"]} <= {0, 130, -signal.SIGTERM}
    assert all(p["rounds_completed"] >= 1 for p in summary["per_peer"])
    for peer in read_json(out / "swarm.json")["peers"]:
        with pytest.raises(ProcessLookupError):
            os.kill(peer["pid"], 0)
    for i in range(3):  # each peer said goodbye in its own summary
        assert read_json(peer_folder(out, i) / "summary.json")["state"] == "stopped"


MNIST_ROUNDS = 3


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_six_peer_mnist_swarm_matches_the_simulator(tmp_path: Path) -> None:
    """The same session run as 6 processes and in the simulator ends within 1 point of accuracy."""
    if not (DATA / "mnist").is_dir():
        pytest.skip(f"MNIST is not in {DATA} (set FEDTORRENT_DATA)")
    import dataclasses

    import torch

    from fedtorrent.config import SimConfig, TopologyConfig
    from fedtorrent.net.torrent import load_torrent
    from fedtorrent.sim.run import load_for, run_one

    torrent_path = _create(
        tmp_path / "mnist.torrent", dataset="mnist", rounds=MNIST_ROUNDS, nodes=6, cohort=3
    )
    session = load_torrent(torrent_path).session
    assert session.mixing.rule == "learned"
    assert session.round_schedule == "cosine"  # create's default, as simulate's
    out = tmp_path / "run"
    config = SwarmConfig(torrent=torrent_path, out=out, peers=6, data_dir=DATA, exchange_timeout=30)
    summary = run_swarm(config, timeout=240)
    assert summary["finished"] == 6, summary["per_peer"]
    assert all(p["rounds_completed"] == MNIST_ROUNDS for p in summary["per_peer"])
    band = summary["bandwidth"]
    assert band["central_server_bytes"] == 2 * 6 * MNIST_ROUNDS * session.state_size
    # The tracker only lists peers: far fewer bytes than one aggregating server would move.
    assert 0 < band["tracker_bytes"] < band["central_server_bytes"] / 10
    assert band["p2p_bytes_received"] >= 6 * MNIST_ROUNDS * session.state_size  # >= 1 per round
    for name in ("accuracy.png", "bytes.png", "bandwidth.png"):
        assert (out / "plots" / name).exists()

    sim = SimConfig(
        data=dataclasses.replace(session.data, data_dir=DATA),
        model=session.model,
        train=session.train,
        mixing=session.mixing,
        topology=TopologyConfig(kind="random_cohort", degree=session.cohort_size),
        rounds=session.rounds,
        round_schedule=session.round_schedule,  # the same lr in each round on both sides
        seed=session.train.seed,
    )
    torch.set_num_threads(1)
    outcome = run_one(sim, dataset=load_for(sim))
    simulated = sum(outcome.accuracies) / len(outcome.accuracies)
    swarm_mean = summary["test_accuracy_mean"]
    assert abs(swarm_mean - simulated) <= 0.01, (swarm_mean, simulated)


def _churn_run(tmp_path: Path, churn: str, *, rounds: int) -> tuple[dict, dict[str, int]]:
    """Six real digits peers under ``churn``; the summary and the plan (kind -> node).

    Rounds are made slower than digits needs (20 epochs of batches of 8, about 0.2 s) so that
    the run outlasts a late joiner's start (importing torch, a few seconds).
    """
    torrent = _create(
        tmp_path / "churn.torrent", dataset="digits", rounds=rounds, nodes=6, epochs=20,
        batch_size=8,
    )  # fmt: skip
    config = SwarmConfig(
        torrent=torrent, out=tmp_path / "run", peers=6, exchange_timeout=20.0, churn=churn,
        env={"OMP_NUM_THREADS": "1"}, stop_grace=5.0,
    )  # fmt: skip
    summary = run_swarm(config, timeout=200, plots=False, progress=False)
    plan = {a["kind"]: a["node"] for a in read_json(config.out / "churn.json")["plan"]}
    return summary, plan


def _records(tmp_path: Path, node: int) -> list[dict]:
    return read_records(peer_folder(tmp_path / "run", node) / "metrics.jsonl")


# --- stragglers and the asynchronous mode --------------------------------------------------------


def test_slow_specs_parse_and_pick_the_last_peers() -> None:
    from fedtorrent.node.swarm import SlowPeers

    assert SlowPeers.parse("25%x4") == SlowPeers(0.25, 4.0)
    assert SlowPeers.parse("0.25") == SlowPeers(0.25, 4.0)
    assert SlowPeers.parse(" 10% X 2.5 ") == SlowPeers(0.10, 2.5)
    assert SlowPeers.parse("100%x1") == SlowPeers(1.0, 1.0)
    assert SlowPeers(0.25).nodes(12) == [9, 10, 11]
    assert SlowPeers(0.25).nodes(6) == [4, 5]  # ceil
    assert SlowPeers(0.1).nodes(30) == [27, 28, 29]  # no float rounding up to 4
    assert SlowPeers(1.0).nodes(2) == [0, 1]
    for bad, says in (
        ("", "expected FRACTION"), ("abc", "expected FRACTION"), ("25%x", "expected FRACTION"),
        ("-5%", "expected FRACTION"), ("0%", "in \\(0, 1\\]"), ("150%", "in \\(0, 1\\]"),
        ("25%x0.5", ">= 1"), ("1.5", "in \\(0, 1\\]"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=says) as caught:
            SlowPeers.parse(bad)
        assert "\n" not in str(caught.value)


def test_slow_peers_and_staleness_reach_the_peer_command_lines(digits_torrent: Path) -> None:
    from fedtorrent.net.torrent import load_torrent
    from fedtorrent.node.swarm import Swarm

    config = SwarmConfig(
        torrent=digits_torrent, out=Path("unused"), peers=4, slow="25%x3", staleness=2
    )
    swarm = Swarm(config)
    swarm.torrent, swarm.tracker_url = load_torrent(digits_torrent), "http://127.0.0.1:1/announce"
    commands = [swarm.peer_command(i) for i in range(4)]
    assert all(c[c.index("--staleness") + 1] == "2" for c in commands)
    assert ["--slowdown" in c for c in commands] == [False, False, False, True]
    assert commands[3][commands[3].index("--slowdown") + 1] == "3.0"
    with pytest.raises(ConfigError, match="--slow"):
        SwarmConfig(torrent=digits_torrent, out=Path("unused"), slow="fast")
    with pytest.raises(ConfigError, match="staleness"):
        SwarmConfig(torrent=digits_torrent, out=Path("unused"), staleness=-1)


def _mnist_torrent(folder: Path, *, rounds: int, nodes: int) -> Path:
    if not (DATA / "mnist").is_dir():
        pytest.skip(f"MNIST is not in {DATA} (set FEDTORRENT_DATA)")
    return _create(folder / "mnist.torrent", dataset="mnist", rounds=rounds, nodes=nodes, cohort=3)


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_asynchronous_peers_do_not_wait_for_a_slow_one(tmp_path: Path) -> None:
    """4 real peers, one 6x slower, --staleness 2: the others' rounds are far shorter than its."""
    torrent = _mnist_torrent(tmp_path, rounds=3, nodes=4)
    out = tmp_path / "run"
    config = SwarmConfig(
        torrent=torrent, out=out, peers=4, data_dir=DATA, exchange_timeout=20, slow="25%x6",
        staleness=2, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    summary = run_swarm(config, timeout=240, plots=False, progress=False)
    assert summary["finished"] == 4, summary["per_peer"]
    assert summary["slow_peers"] == [3]
    records = {i: read_records(peer_folder(out, i) / "metrics.jsonl") for i in range(4)}
    slow = [r["duration_s"] for r in records[3][1:]]  # the first round waits for the swarm
    for i in range(3):
        fast = [r["duration_s"] for r in records[i][1:]]
        assert sum(fast) / len(fast) < 0.6 * sum(slow) / len(slow), (fast, slow)
        assert all(r["max_staleness"] == 2 for r in records[i])
        assert all(s <= 2 for r in records[i] for s in r["staleness"].values())
    assert all(r["slowdown"] == 6.0 and r["timings"]["slowdown"] > 0 for r in records[3])


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_late_joiner_and_a_graceful_leaver_in_a_real_swarm(tmp_path: Path) -> None:
    summary, plan = _churn_run(tmp_path, "join=1@r3,leave=1@r3", rounds=30)
    churn, joiner, leaver = summary["churn"], plan["join"], plan["leave"]
    assert churn["survivors_finished"] == 5, summary["per_peer"]
    joined = read_json(peer_folder(tmp_path / "run", joiner) / "joined.json")
    assert 3 <= joined["round"] < 30 and len(joined["sources"]) >= 2  # neighbours' states
    rounds = [r["round"] for r in _records(tmp_path, joiner)]
    assert rounds == list(range(joined["round"] + 1, 31))  # from the round after, not round 1
    fate = next(p["fate"] for p in summary["per_peer"] if p["node"] == joiner)
    assert fate == f"joined@r{joined['round']}, finished"
    assert churn["joiner_accuracy_mean"] > 0.5
    assert abs(churn["joiner_accuracy_mean"] - churn["others_accuracy_mean"]) < 0.1
    left_at = max(r["round"] for r in _records(tmp_path, leaver))
    assert 3 <= left_at < 30
    # Nobody waited out the 20 s exchange timeout for the leaver: it said it was gone, or the
    # tracker had already dropped it.
    for node in set(range(6)) - {leaver}:
        for record in _records(tmp_path, node):
            assert record["missing"].get(f"peer-{leaver}") in (None, "refused:gone", "unreachable")
            if record["round"] > left_at:
                assert record["duration_s"] < 10, record


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_killed_peer_resumes_and_the_tracker_restarts_in_a_real_swarm(tmp_path: Path) -> None:
    summary, plan = _churn_run(tmp_path, "kill=1@r3+2,tracker@r5+2", rounds=20)
    churn, killed = summary["churn"], plan["kill"]
    assert summary["finished"] == 6, summary["per_peer"]
    assert (churn["killed"], churn["resumed"], churn["tracker_restarts"]) == (1, 1, 1)
    assert [r["round"] for r in _records(tmp_path, killed)] == list(range(1, 21))  # each once
    fate = next(p["fate"] for p in summary["per_peer"] if p["node"] == killed)
    assert re.fullmatch(r"killed@r\d+, resumed@r\d+, finished", fate), fate
    log = (peer_folder(tmp_path / "run", killed) / "peer.log").read_text()
    assert "resuming after round" in log
    # The peers trained through the restart on cached answers and found the tracker again.
    words = [r["tracker"] for n in range(6) for r in _records(tmp_path, n)]
    assert {"cached", "down"} & set(words), words
    assert all(_records(tmp_path, n)[-1]["tracker"] == "ok" for n in range(6))
    assert (tmp_path / "run" / "tracker.sqlite").exists()


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_killed_peer_costs_its_neighbours_at_most_one_short_deadline(tmp_path: Path) -> None:
    """SIGKILL one of 4 real peers after round 3: it costs its neighbours no more than a short,
    adapted deadline (on loopback its closed port refuses at once: ``unreachable``), far below
    the 20 s cap; its first fast failure is forgiven, the second backs it off."""
    from fedtorrent.node.swarm import Swarm

    cap = 20.0
    torrent = _mnist_torrent(tmp_path, rounds=6, nodes=4)
    out = tmp_path / "run"
    config = SwarmConfig(
        torrent=torrent, out=out, peers=4, data_dir=DATA, exchange_timeout=cap,
        env={"OMP_NUM_THREADS": "1"}, stop_grace=5,
    )  # fmt: skip
    with Swarm(config) as swarm:
        _wait_for_rounds(out, 4, at_least=3, timeout=240)
        victim = next(v for v in swarm.views() if v.index == 3)
        os.kill(victim.pid, signal.SIGKILL)
        assert swarm.wait(timeout=240)
    for i in range(3):
        records = read_records(peer_folder(out, i) / "metrics.jsonl")
        assert len(records) == 6
        lost = [r for r in records if "peer-3" in r["silent"] or "peer-3" in r["missing"]]
        assert lost, "the dead peer was never dialled"
        # a dial racing the kill may reach the dying socket: the handshake then fails, just as fast
        fast = {"unreachable", "handshake_failed", "timeout"}
        assert {r["missing"].get("peer-3", "timeout") for r in lost} <= fast
        after = [r for r in records if r["round"] >= lost[0]["round"]]
        assert all(r["deadline_s"] < cap / 2 for r in after), [r["deadline_s"] for r in after]
        assert all(r["timings"]["exchange"] < cap / 2 for r in after)
        # a good neighbour's first fast failure is forgiven; the second backs it off two rounds
        assert len(lost) <= 2, [r["round"] for r in lost]
        if len(lost) == 2:
            later = [r for r in records if 0 < r["round"] - lost[1]["round"] <= 2]
            assert all(
                r["skipped"].get("peer-3") == "backed_off" or "peer-3" not in r["cohort"]
                for r in later
            )
