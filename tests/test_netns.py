"""Peers as separate network hosts: Linux network namespaces joined by veth links and a bridge.

One namespace holds the tracker and a bridge (10.77.0.1/24); each peer gets its own namespace whose
only interface is a veth link into that bridge (10.77.0.11, .12, ...). Both ends of every link are
created directly inside the namespaces, so no interface or address ever appears on this machine's
own network, and nothing leaves the namespaces. Needs root and iproute2; skips with the reason
otherwise. Namespaces are always deleted, and processes in them killed, by the fixture.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtorrent.metrics.records import read_json, read_records
from fedtorrent.node.swarm import peer_folder, summarize_swarm

PEERS = 3
SUBNET = "10.77.0"
TRACKER_IP = f"{SUBNET}.1"
TRACKER_PORT = 6969
PEER_PORT = 7000
_CLI = "from fedtorrent.cli import main; main()"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def _netns_unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is not installed"
    probe = f"ftprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    try:
        link = _ip(
            "link", "add", "p0", "netns", probe, "type", "veth", "peer", "name", "p1", "netns",
            probe, check=False,
        )  # fmt: skip
        if link.returncode != 0:
            return f"veth links cannot be created in a namespace: {link.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


class Hosts:
    """The namespaces of one test and the processes started in them."""

    def __init__(self, prefix: str) -> None:
        self.tracker_ns = f"{prefix}t"
        self.peer_ns = [f"{prefix}p{i}" for i in range(PEERS)]
        self.processes: list[subprocess.Popen[str]] = []

    def build(self) -> None:
        ns = self.tracker_ns
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", ns, "addr", "add", f"{TRACKER_IP}/24", "dev", "br0")
        _ip("-n", ns, "link", "set", "br0", "up")
        for i, peer_ns in enumerate(self.peer_ns):
            _ip("netns", "add", peer_ns)
            _ip("-n", peer_ns, "link", "set", "lo", "up")
            # Both ends are born inside namespaces: nothing touches the host's own network.
            _ip(
                "link", "add", f"v{i}", "netns", ns, "type", "veth",
                "peer", "name", "eth0", "netns", peer_ns,
            )  # fmt: skip
            _ip("-n", ns, "link", "set", f"v{i}", "master", "br0", "up")
            _ip("-n", peer_ns, "addr", "add", f"{self.peer_ip(i)}/24", "dev", "eth0")
            _ip("-n", peer_ns, "link", "set", "eth0", "up")

    @staticmethod
    def peer_ip(index: int) -> str:
        return f"{SUBNET}.{11 + index}"

    def start(self, ns: str, *args: str, log: Path | None = None) -> subprocess.Popen[str]:
        """Run the fedtorrent CLI inside namespace ``ns``."""
        command = ["ip", "netns", "exec", ns, sys.executable, "-c", _CLI, *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        if log is None:
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
            )
        else:
            with log.open("w") as handle:
                process = subprocess.Popen(
                    command, stdout=handle, stderr=subprocess.STDOUT, text=True, env=env
                )
        self.processes.append(process)
        return process

    def teardown(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        for ns in [*self.peer_ns, self.tracker_ns]:
            _ip("netns", "del", ns, check=False)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    made = Hosts(f"ft{os.getpid() % 100000}")
    try:
        made.build()
        yield made
    finally:
        made.teardown()
    listed = _ip("netns", "list").stdout
    assert made.tracker_ns not in listed and not any(ns in listed for ns in made.peer_ns)


def _wait_for_line(process: subprocess.Popen[str], needle: str, timeout: float) -> str:
    """Read ``process``'s stdout until a line contains ``needle``; fail after ``timeout`` s."""
    stdout = process.stdout
    assert stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    # A thread reads, so the wait below is bounded even while the pipe stays silent.
    threading.Thread(target=lambda: [lines.put(x) for x in stdout], daemon=True).start()
    deadline = time.monotonic() + timeout
    seen = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        seen.append(line)
        if needle in line:
            return line
    pytest.fail(f"no line with {needle!r} within {timeout} s; got: {''.join(seen)[-2000:]}")


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_peers_in_separate_namespaces_exchange_and_finish(hosts: Hosts, tmp_path: Path) -> None:
    from fedtorrent.cli.net import create
    from fedtorrent.net.torrent import load_torrent

    torrent_path = tmp_path / "digits.torrent"
    create(
        output=torrent_path,
        tracker=f"http://{TRACKER_IP}:{TRACKER_PORT}/announce",
        dataset="digits",
        model="logreg",
        nodes=PEERS,
        rounds=3,
        cohort=PEERS - 1,
    )
    tracker = hosts.start(
        hosts.tracker_ns,
        "tracker",
        "--host",
        TRACKER_IP,
        "--port",
        str(TRACKER_PORT),
        "--serve",
        str(torrent_path),
        "--interval",
        "5",
    )
    _wait_for_line(tracker, "tracker listening", timeout=60)
    out = tmp_path / "run"
    peers = []
    for i, ns in enumerate(hosts.peer_ns):
        folder = peer_folder(out, i)
        folder.mkdir(parents=True)
        peers.append(
            hosts.start(
                ns,
                "peer",
                str(torrent_path),
                "--out",
                str(folder),
                "--node-index",
                str(i),
                "--num-nodes",
                str(PEERS),
                "--host",
                hosts.peer_ip(i),
                "--port",
                str(PEER_PORT),
                "--exchange-timeout",
                "20",
                log=folder / "console.log",
            )
        )
    deadline = time.monotonic() + 180
    for i, process in enumerate(peers):
        try:
            code = process.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"peer {i} did not finish: {_tail(peer_folder(out, i) / 'console.log')}")
        assert code == 0, _tail(peer_folder(out, i) / "console.log")

    for i in range(PEERS):
        folder = peer_folder(out, i)
        assert read_json(folder / "status.json")["state"] == "done"
        records = read_records(folder / "metrics.jsonl")
        assert [r["round"] for r in records] == [1, 2, 3]
        heard = [r["heard_from"] for r in records]
        assert any(heard), f"peer {i} never heard from another peer across the namespaces"
        assert sum(r["bytes_received"] for r in records) > 0
        assert sum(r["bytes_sent"] for r in records) > 0

    # The tracker is only reachable inside the namespaces: ask it from there.
    torrent = load_torrent(torrent_path)
    query = (
        "import json; from fedtorrent.net.tracker.client import TrackerClient; "
        f"print(json.dumps(TrackerClient({torrent.announce!r}).swarm({torrent.info_hash!r})))"
    )
    answer = subprocess.run(
        ["ip", "netns", "exec", hosts.tracker_ns, sys.executable, "-c", query],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    stats = json.loads(answer.stdout)
    assert stats["announces"] >= PEERS * 3
    traffic = {"bytes_in": stats["tracker_bytes_in"], "bytes_out": stats["tracker_bytes_out"]}
    summary = summarize_swarm(out, torrent=torrent, tracker_traffic=traffic, plots=False)
    assert summary["finished"] == PEERS
    assert summary["bandwidth"]["tracker_bytes"] > 0
    assert summary["bandwidth"]["p2p_bytes_sent"] > 0
    assert summary["test_accuracy_mean"] > 0.5


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text()[-chars:] if path.exists() else f"(no {path.name})"
