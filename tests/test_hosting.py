"""Several peers per process (``swarm --processes``, ``fedtorrent host``): real peers on threads.

Each hosted peer still has its own socket, identity, folder and log; the launcher deals the peers
over the processes, gives peers marked solo a process of their own, and measures the processes'
CPU and memory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedtorrent.errors import ConfigError
from fedtorrent.metrics.records import read_json, read_records
from fedtorrent.node.swarm import (
    SwarmConfig,
    default_processes,
    host_groups,
    peer_folder,
    run_swarm,
)

CLI = "from fedtorrent.cli import main; main()"


def test_small_swarms_run_a_process_per_peer_and_large_ones_share() -> None:
    assert default_processes(6, cpus=2) == 6
    assert default_processes(8, cpus=16) == 8
    assert default_processes(24, cpus=2) == 2
    assert default_processes(100, cpus=2) == 4  # at most 25 peers per process
    assert default_processes(100, cpus=16) == 16  # one per core
    assert default_processes(10, cpus=64) == 10  # never more processes than peers


def test_host_groups_deal_peers_round_robin_and_keep_solo_peers_alone() -> None:
    assert host_groups(5, 2) == [[0, 2, 4], [1, 3]]
    assert host_groups(6, 3, frozenset({1, 4})) == [[1], [4], [0, 2, 3, 5]]
    assert host_groups(3, 3, frozenset({0, 1, 2})) == [[0], [1], [2]]
    groups = host_groups(100, 4, frozenset({7}))
    assert sorted(i for g in groups for i in g) == list(range(100)) and len(groups) == 4


def test_config_refuses_impossible_process_counts(tmp_path: Path) -> None:
    for processes in (0, 5):
        with pytest.raises(ConfigError, match="processes"):
            SwarmConfig(torrent=tmp_path / "t", out=tmp_path, peers=4, processes=processes)
    with pytest.raises(ConfigError, match="custom peer command"):
        SwarmConfig(torrent=tmp_path / "t", out=tmp_path, peers=4, processes=2,
                    peer_command=("python", "x.py"))  # fmt: skip
    with pytest.raises(ConfigError, match="solo"):
        SwarmConfig(torrent=tmp_path / "t", out=tmp_path, peers=4, solo=frozenset({4}))


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (b"{not json", "cannot read host plan"),
        (b'{"peers": []}', "non-empty list"),
        (b'{"peers": [["t.torrent", 3]]}', "non-empty list"),
    ],
)
def test_a_bad_host_plan_is_one_line_and_exit_2(tmp_path: Path, plan: bytes, message: str) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(plan)
    done = subprocess.run(
        [sys.executable, "-c", CLI, "host", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


@pytest.mark.network
@pytest.mark.timeout(240)
def test_hosted_peers_share_processes_but_keep_their_own_sockets_folders_and_logs(
    tmp_path: Path,
) -> None:
    from fedtorrent.cli.net import create

    torrent = tmp_path / "digits.torrent"
    create(output=torrent, dataset="digits", model="logreg", nodes=5, rounds=3, cohort=2)  # type: ignore[arg-type]
    out = tmp_path / "run"
    config = SwarmConfig(
        torrent=torrent, out=out, peers=5, processes=3, solo=frozenset({4}), exchange_timeout=30,
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    summary = run_swarm(config, timeout=200, plots=False, progress=False)
    assert summary["finished"] == 5, summary["per_peer"]
    launch = read_json(out / "swarm.json")
    pids = {p["index"]: p["pid"] for p in launch["peers"]}
    assert len(set(pids.values())) == 3 and list(pids.values()).count(pids[4]) == 1
    assert summary["resources"]["processes"] == 3
    assert summary["resources"]["peak_memory_bytes"] > 0
    assert summary["resources"]["cpu_seconds"] > 0
    ports = set()
    for index in range(5):
        folder = peer_folder(out, index)
        records = read_records(folder / "metrics.jsonl")
        assert [r["round"] for r in records] == [1, 2, 3]
        assert all(r["heard"] == 2 for r in records), records  # each heard its cohort
        log = (folder / "peer.log").read_text()
        assert f"peer peer-{index} of session" in log
        others = {int(i) for i in re.findall(r"peer peer-(\d+) of session", log)}
        assert others == {index}, log  # a hosted peer's log holds its own records only
        ports.add(json.loads((folder / "status.json").read_text())["address"])
    assert len(ports) == 5  # a socket each
    hosted = [f for f in (out / "hosts").iterdir()]
    assert len(hosted) == 2 and all((f / "plan.json").exists() for f in hosted)
    assert os.environ.get("FEDTORRENT_SWARM_PEER") is None


def test_the_live_table_folds_peers_beyond_the_screen_into_one_row() -> None:
    from rich.console import Console

    from fedtorrent.cli.swarm import peer_table
    from fedtorrent.node.swarm import view_of

    views = [
        view_of(i, pid=100 + i, returncode=None,
                status={"state": "done" if i % 3 == 0 else "running", "round": i % 5, "rounds": 9})
        for i in range(100)
    ]  # fmt: skip
    console = Console(width=120, record=True)
    console.print(peer_table(views, max_rows=10))
    text = console.export_text()
    assert "+91 more" in text
    hidden = views[9:]
    done = sum(v.state == "done" for v in hidden)
    assert f"{done} done, {len(hidden) - done} running" in text
    assert text.count("running") + text.count("done") == 9 + 2
