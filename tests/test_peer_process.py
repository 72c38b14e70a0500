"""Real ``fedtorrent peer`` processes on loopback: crashes, a tracker outage, hostile messages.

Each test runs a real tracker (``BackgroundTracker``, SQLite on disk) in this process and peers as
separate processes over ZeroMQ on 127.0.0.1. Waiting is by polling the files the peers write
(``status.json``, ``checkpoint.json``) against a deadline, never by fixed sleeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq

from fedtorrent.config import TrackerConfig
from fedtorrent.metrics.records import read_records
from fedtorrent.net import wire
from fedtorrent.net.identity import PeerIdentity
from fedtorrent.net.torrent import load_torrent
from fedtorrent.net.tracker.client import TrackerClient
from fedtorrent.net.tracker.server import BackgroundTracker
from fedtorrent.state import encode_state

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]
_CLI = "from fedtorrent.cli import main; main()"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def create_torrent(folder: Path, url: str, *, nodes: int, cohort: int, rounds: int) -> Path:
    from fedtorrent.cli.net import create

    path = folder / "session.torrent"
    create(
        output=path,
        tracker=f"{url}/announce",
        dataset="digits",
        nodes=nodes,
        cohort=cohort,
        rounds=rounds,
        mixing="learned",
        trust_steps=3,
        batch_size=32,
    )
    return path


def wait_for(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # a poll interval, not a synchronisation


def status(folder: Path) -> dict[str, Any]:
    try:
        loaded: dict[str, Any] = json.loads((folder / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return loaded


class Peers:
    """Peer processes of one session; every one left running is killed at the end."""

    def __init__(self, torrent: Path, root: Path, *, nodes: int, timeout: float = 2.0) -> None:
        self.torrent, self.root, self.nodes, self.timeout = torrent, root, nodes, timeout
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def folder(self, index: int) -> Path:
        return self.root / f"peer-{index}"

    def start(self, index: int, *extra: str) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "FEDTORRENT_DATA": os.environ.get("FEDTORRENT_DATA", "/work/shared/data"),
            "OMP_NUM_THREADS": "1",
        }
        command = [
            sys.executable, "-c", _CLI, "peer", str(self.torrent),
            "--out", str(self.folder(index)),
            "--node-index", str(index), "--num-nodes", str(self.nodes),
            "--exchange-timeout", str(self.timeout), *extra,
        ]  # fmt: skip
        self.folder(index).mkdir(parents=True, exist_ok=True)
        log = (self.folder(index) / "console.log").open("ab")
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs[index] = proc
        return proc

    def round(self, index: int) -> int:
        return int(status(self.folder(index)).get("round") or 0)

    def wait_all(self, timeout: float) -> dict[int, int]:
        deadline = time.monotonic() + timeout
        codes = {}
        for index, proc in self.procs.items():
            codes[index] = proc.wait(max(0.1, deadline - time.monotonic()))
        return codes

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@contextlib.contextmanager
def running_tracker(port: int, db: Path, *, interval: int = 1) -> Iterator[BackgroundTracker]:
    config = TrackerConfig(port=port, db_path=db, interval=interval, rate_limit=0)
    with BackgroundTracker(config) as tracker:
        yield tracker


def test_a_killed_peer_resumes_from_its_checkpoint_while_the_others_finish(
    tmp_path: Path,
) -> None:
    port = free_port()
    with running_tracker(port, tmp_path / "tracker.db") as tracker:
        torrent = create_torrent(tmp_path, tracker.url, nodes=3, cohort=2, rounds=12)
        peers = Peers(torrent, tmp_path, nodes=3)
        try:
            for index in range(3):
                peers.start(index)
            wait_for(lambda: peers.round(2) >= 3, timeout=45, what="peer 2 at round 3")
            peers.procs[2].send_signal(signal.SIGKILL)
            assert peers.procs[2].wait(10) == -signal.SIGKILL
            saved = json.loads((peers.folder(2) / "checkpoint.json").read_text())["round"]
            assert 3 <= saved < 12
            assert status(peers.folder(2))["state"] == "running"  # it never said goodbye
            peers.start(2, "--resume")
            codes = peers.wait_all(timeout=60)
        finally:
            peers.kill_all()
    assert codes == {0: 0, 1: 0, 2: 0}
    for index in range(3):
        final = status(peers.folder(index))
        assert final["state"] == "done" and final["round"] == 12
        rounds = [r["round"] for r in read_records(peers.folder(index) / "metrics.jsonl")]
        assert rounds == list(range(1, 13))  # each round exactly once, also across the crash
    log = (peers.folder(2) / "peer.log").read_text()
    # The model file is written before checkpoint.json: a kill between the two leaves the json one
    # round behind, and the peer resumes from the model file's newer round.
    resumed = [int(n) for n in re.findall(r"resuming after round (\d+)", log)]
    assert len(resumed) == 1 and saved <= resumed[0] <= saved + 1, log
    summary = json.loads((peers.folder(2) / "summary.json").read_text())
    assert summary["rounds_done"] == 12 and summary["test"]["accuracy"] > 0.5


def test_peers_train_through_a_tracker_outage_and_reannounce(tmp_path: Path) -> None:
    port, db = free_port(), tmp_path / "tracker.db"
    tracker = BackgroundTracker(TrackerConfig(port=port, db_path=db, interval=1, rate_limit=0))
    tracker.start()
    torrent = create_torrent(tmp_path, tracker.url, nodes=3, cohort=2, rounds=100_000)
    info_hash = load_torrent(torrent).info_hash
    peers = Peers(torrent, tmp_path, nodes=3)
    try:
        for index in range(3):
            peers.start(index, "--fixed-deadline")  # the cached cohort, never cut short
        wait_for(lambda: min(peers.round(i) for i in range(3)) >= 2, timeout=45, what="round 2")
        tracker.close()
        before = [peers.round(i) for i in range(3)]
        wait_for(
            lambda: all(
                status(peers.folder(i)).get("tracker") == "down" and peers.round(i) >= before[i] + 3
                for i in range(3)
            ),
            timeout=30,
            what="peers training on while the tracker is down",
        )
        tracker = BackgroundTracker(TrackerConfig(port=port, db_path=db, interval=1, rate_limit=0))
        tracker.start()
        back = [peers.round(i) for i in range(3)]
        wait_for(
            lambda: all(
                status(peers.folder(i)).get("tracker") == "ok" and peers.round(i) >= back[i] + 2
                for i in range(3)
            ),
            timeout=30,
            what="peers re-announcing to the restarted tracker",
        )
        scrape = TrackerClient(tracker.url, retries=0).scrape([info_hash])
        assert scrape[info_hash]["incomplete"] == 3
        for proc in peers.procs.values():
            proc.send_signal(signal.SIGTERM)
        codes = peers.wait_all(timeout=30)
        # Their ids are bound to their keys (also across the restart): only signed stops count.
        scrape = TrackerClient(tracker.url, retries=0).scrape([info_hash])
        assert scrape[info_hash]["incomplete"] == 0
    finally:
        peers.kill_all()
        tracker.close()
    assert codes == {0: 0, 1: 0, 2: 0}
    for index in range(3):
        records = read_records(peers.folder(index) / "metrics.jsonl")
        kinds = [r["tracker"] for r in records]
        outage = [r for r in records if r["tracker"] == "cached"]
        assert outage, kinds
        # The cached cohort kept answering: every outage round heard a neighbour, most both (a
        # neighbour slowed by a loaded machine can miss one fixed deadline).
        assert all(r["heard"] >= 1 for r in outage[1:]), outage
        assert 2 * sum(r["heard"] == 2 for r in outage[1:]) >= len(outage[1:]), outage
        assert kinds[-1] == "ok"
        final = status(peers.folder(index))
        assert final["state"] == "stopped"
        summary = json.loads((peers.folder(index) / "summary.json").read_text())
        assert summary["tracker"]["announces"]["reconnected"] >= 1
        assert summary["state"] == "stopped"


class HostilePeer:
    """A ROUTER that answers every request with a bad reply, on its own thread.

    Bad reply ``kind`` of the five (NaN, wrong shape, another session, garbage, huge), signed as
    ``sender``; one hostile peer per kind, since a peer backs off from one that lied.
    """

    def __init__(self, info_hash: str, state_size: int, *, kind: int, sender: str) -> None:
        good = {"1.bias": torch.zeros(10), "1.weight": torch.zeros(10, 64)}
        nan = {**good, "1.weight": torch.full((10, 64), float("nan"))}
        wrong = {**good, "1.weight": torch.zeros(10, 65)}

        def state(tensors: dict[str, torch.Tensor], session: str = info_hash) -> list[bytes]:
            payload = encode_state(tensors)
            return wire.encode_message(
                payload, info_hash=session, sender=sender, round=10**6, num_examples=1
            )

        huge = wire.Header(
            kind="state",
            info_hash=info_hash,
            sender=sender,
            round=10**6,
            num_examples=1,
            payload_len=100 * state_size,
            payload_sha256="0" * 64,
        )
        self.reply = [
            state(nan),
            state(wrong),
            state(good, "cd" * 32),
            [b"\xc1 this is not msgpack"],
            [wire.encode_header(huge)],
        ][kind]
        self.identity = PeerIdentity.generate()  # announced, so honest peers dial it
        self.context: zmq.Context[Any] = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.CURVE_SERVER, 1)
        self.router.setsockopt(zmq.CURVE_SECRETKEY, self.identity.curve_secret)
        self.router.setsockopt(zmq.CURVE_PUBLICKEY, self.identity.curve_public)
        self.port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.stop = threading.Event()
        self.answered = 0
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self) -> None:
        while not self.stop.is_set():
            if not self.router.poll(100):
                continue
            identity, *_ = self.router.recv_multipart()
            for frame in self.reply:  # header, then payload: separate messages, as peers send them
                self.router.send_multipart([identity, frame])
            self.answered += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.router.close(0)
        self.context.term()


def ask(
    address: str, frames: list[bytes], *, server_key: bytes, timeout_ms: int = 5000
) -> list[bytes] | None:
    """Send raw frames to a live peer's socket; its answer, or None when it said nothing."""
    context: zmq.Context[Any] = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    public, secret = zmq.curve_keypair()  # any key: the swarm is open
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    try:
        sock.connect(address)
        sock.send_multipart(frames)
        if not sock.poll(timeout_ms):
            return None
        return list(sock.recv_multipart())
    finally:
        sock.close(0)


def test_bad_messages_to_a_live_peer_are_rejected_counted_and_it_keeps_training(
    tmp_path: Path,
) -> None:
    port = free_port()
    with running_tracker(port, tmp_path / "tracker.db", interval=30) as tracker:
        torrent_path = create_torrent(tmp_path, tracker.url, nodes=2, cohort=5, rounds=100_000)
        torrent = load_torrent(torrent_path)
        info_hash = torrent.info_hash
        evil = [f"evil-{i}" for i in range(5)]
        hostile = [HostilePeer(info_hash, torrent.session.state_size, kind=i, sender=name)
                   for i, name in enumerate(evil)]  # fmt: skip
        for name, server in zip(evil, hostile, strict=True):
            server.thread.start()
            TrackerClient(tracker.url, retries=0).announce(
                info_hash,
                name,
                port=server.port,
                event="started",
                pubkey=server.identity.public_key_hex,
            )
        peers = Peers(torrent_path, tmp_path, nodes=2, timeout=1.0)
        try:
            peers.start(0)
            # Its only neighbours are the hostile ones, each bad in another way.
            reasons = {"non_finite", "bad_shape", "wrong_session", "bad_header", "oversized"}
            wait_for(
                lambda: reasons <= set(status(peers.folder(0)).get("rejections", {})),
                timeout=45,
                what="every kind of bad reply rejected",
            )
            # Now bad requests, straight to its socket: each is answered with an error.
            address = status(peers.folder(0))["address"]
            key = (peers.folder(0) / "keys" / "curve.pub").read_bytes().strip()
            other = wire.encode_request(info_hash="cd" * 32, sender="evil", round=1)
            pushed = wire.encode_message(
                encode_state({"1.bias": torch.full((10,), float("nan"))}),
                info_hash=info_hash,
                sender="evil",
                round=1,
                num_examples=1,
            )
            answers = [
                ask(address, [b"\x00garbage"], server_key=key),
                ask(address, other, server_key=key),
                ask(address, pushed, server_key=key),  # a NaN state pushed unasked
            ]
            errors = [wire.decode_header(a[0], info_hash=info_hash) for a in answers if a]
            assert [(e.kind, e.reason) for e in errors] == [
                ("error", "bad_header"),
                ("error", "wrong_session"),
                ("error", "bad_frames"),
            ]
            assert ask(address, [b"x" * 10_000], server_key=key, timeout_ms=500) is None
            assert (  # the wrong server key: the handshake fails, nothing is exchanged
                ask(address, [b"\x00garbage"], server_key=zmq.curve_keypair()[0], timeout_ms=300)
                is None
            )
            reached = peers.round(0)
            wait_for(lambda: peers.round(0) >= reached + 3, timeout=30, what="training going on")
            peers.procs[0].send_signal(signal.SIGTERM)
            codes = peers.wait_all(timeout=30)
        finally:
            peers.kill_all()
            for server in hostile:
                server.close()
    assert codes == {0: 0}
    summary = json.loads((peers.folder(0) / "summary.json").read_text())
    rejections = summary["rejections"]
    assert reasons | {"bad_frames"} <= set(rejections)
    assert rejections["wrong_session"] >= 2  # one reply, one request
    assert set(summary["rejections_per_peer"]) >= {*evil, "<unknown>"}
    assert status(peers.folder(0))["state"] == "stopped"
    records = read_records(peers.folder(0) / "metrics.jsonl")
    assert all(r["heard"] == 0 for r in records)
    assert set(records[0]["rejected_from"]) == set(evil)
    for record in records[1:]:  # each liar is rejected, then backed off: never heard
        assert all(record["skipped"].get(p) == "backed_off" or p in record["rejected_from"]
                   for p in evil)  # fmt: skip
    assert records[-1]["round"] >= reached + 3
