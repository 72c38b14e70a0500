"""A live swarm flooded with fake peer ids: the neighbour book keeps honest peers together.

A real tracker runs in this process; 60 fake ids announce from 15 loopback addresses, each with a
valid Ed25519 key and a port where nothing listens, so the tracker lists 20 times more fakes
than honest peers and a cohort of 20 could be all fakes. Three real ``fedtorrent peer`` processes
then run the session; a clean run of the same session is the yardstick for accuracy.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from fedtorrent.config import TrackerConfig
from fedtorrent.metrics.records import read_records
from fedtorrent.net.torrent import load_torrent
from fedtorrent.net.tracker.server import BackgroundTracker
from fedtorrent.node.swarm import SwarmConfig, peer_folder, run_swarm
from fedtorrent.sybils import announce_fakes, loopback_sources

PEERS = 3
ROUNDS = 5
FAKES = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def session(tmp_path: Path, name: str, url: str) -> Path:
    from fedtorrent.cli.net import create

    torrent = tmp_path / f"{name}.torrent"
    create(
        output=torrent, tracker=url, dataset="digits", model="logreg", nodes=PEERS,
        rounds=ROUNDS, cohort=20, mixing="learned", trust_steps=3, batch_size=32,
        name=f"sybil-{name}",
    )  # fmt: skip
    return torrent


def run(tmp_path: Path, name: str, torrent: Path, url: str) -> dict[str, Any]:
    config = SwarmConfig(
        torrent=torrent, out=tmp_path / name, peers=PEERS, tracker=url, exchange_timeout=10,
        processes=1,  # the honest peers share one process: the flood is the tracker's problem
    )  # fmt: skip
    summary = run_swarm(config, timeout=60, plots=False)
    assert summary["finished"] == PEERS, summary["per_peer"]
    return summary


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_flood_of_fake_peers_cannot_cut_honest_peers_off(tmp_path: Path) -> None:
    config = TrackerConfig(port=free_port(), db_path=tmp_path / "tracker.sqlite", rate_limit=0)
    with BackgroundTracker(config) as tracker:
        url = tracker.server.announce_url
        clean = run(tmp_path, "clean", session(tmp_path, "clean", url), url)

        torrent = session(tmp_path, "flooded", url)
        info_hash = load_torrent(torrent).info_hash
        flood = announce_fakes(url, info_hash, count=FAKES, sources=loopback_sources(15))
        assert flood.accepted, flood.statuses  # a per-address cap may take some, never all
        flooded = run(tmp_path, "flooded", torrent, url)

    fakes = set(flood.accepted)
    honest_heard = []
    for index in range(PEERS):
        records = read_records(peer_folder(tmp_path / "flooded", index) / "metrics.jsonl")
        assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
        heard = [len(set(r["heard_from"]) - fakes) for r in records]
        assert not fakes & {p for r in records for p in r["heard_from"]}
        assert all(h >= 1 for h in heard[1:]), heard  # from round 2 on, every round
        honest_heard += heard
        dialled_fakes = {p for r in records for p in r["cohort"]} & fakes
        assert dialled_fakes, "the fakes were listed: some must have been tried"
    assert sum(honest_heard) / len(honest_heard) >= 1.5

    skipped = flooded["neighbours"]["candidates_skipped"]
    assert skipped.get("backed_off", 0) > 0, flooded["neighbours"]
    assert all(n == PEERS - 1 for n in flooded["neighbours"]["heard_distinct"].values())
    gap = clean["test_accuracy_mean"] - flooded["test_accuracy_mean"]
    assert abs(gap) < 0.03, (clean["test_accuracy_mean"], flooded["test_accuracy_mean"])
