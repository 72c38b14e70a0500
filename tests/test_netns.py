"""Peers as separate network hosts: Linux network namespaces joined by veth links and a bridge.

One namespace holds the tracker and a bridge (10.77.0.1/24); each peer gets its own namespace whose
only interface is a veth link into that bridge (10.77.0.11, .12, ...). Both ends of every link are
created directly inside the namespaces, so no interface or address ever appears on this machine's
own network, and nothing leaves the namespaces. Needs root and iproute2; skips with the reason
otherwise. Namespaces are always deleted, and processes in them killed, by the fixture.

The fault test puts packet loss (nftables), a rate limit (tbf) or a partition that heals
(nftables) on those links, inside the namespaces only, and checks that the swarm finishes and
that its summary reports the retries and the time lost (docs/swarm.md).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedtorrent.metrics.records import read_json, read_records
from fedtorrent.net.torrent import Torrent, load_torrent
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


def _swarm_torrent(tmp_path: Path, *, dataset: str, rounds: int) -> Path:
    """A torrent for ``PEERS`` peers, cohorts of all the others, announcing to the tracker here."""
    from fedtorrent.cli.net import create

    torrent_path = tmp_path / f"{dataset}.torrent"
    create(
        output=torrent_path,
        tracker=f"http://{TRACKER_IP}:{TRACKER_PORT}/announce",
        dataset=dataset,
        model="logreg",
        nodes=PEERS,
        rounds=rounds,
        cohort=PEERS - 1,
    )
    return torrent_path


def _start_swarm(
    hosts: Hosts, torrent_path: Path, out: Path, *, exchange_timeout: float
) -> list[subprocess.Popen[str]]:
    """Start the tracker in its namespace, wait until it listens, then one peer per namespace."""
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
                str(exchange_timeout),
                log=folder / "console.log",
            )
        )
    return peers


def _wait_for_peers(peers: list[subprocess.Popen[str]], out: Path, timeout: float) -> None:
    """Every peer exits 0 within ``timeout`` seconds, else fail with its console's tail."""
    deadline = time.monotonic() + timeout
    for i, process in enumerate(peers):
        try:
            code = process.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"peer {i} did not finish: {_tail(peer_folder(out, i) / 'console.log')}")
        assert code == 0, _tail(peer_folder(out, i) / "console.log")


def _tracker_stats(hosts: Hosts, torrent: Torrent) -> dict[str, Any]:
    """The swarm's stats, asked from inside the tracker's namespace (reachable only there)."""
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
    stats: dict[str, Any] = json.loads(answer.stdout)
    return stats


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_peers_in_separate_namespaces_exchange_and_finish(hosts: Hosts, tmp_path: Path) -> None:
    torrent_path = _swarm_torrent(tmp_path, dataset="digits", rounds=3)
    out = tmp_path / "run"
    peers = _start_swarm(hosts, torrent_path, out, exchange_timeout=20)
    _wait_for_peers(peers, out, timeout=180)

    for i in range(PEERS):
        folder = peer_folder(out, i)
        assert read_json(folder / "status.json")["state"] == "done"
        records = read_records(folder / "metrics.jsonl")
        assert [r["round"] for r in records] == [1, 2, 3]
        heard = [r["heard_from"] for r in records]
        assert any(heard), f"peer {i} never heard from another peer across the namespaces"
        assert sum(r["bytes_received"] for r in records) > 0
        assert sum(r["bytes_sent"] for r in records) > 0

    torrent = load_torrent(torrent_path)
    stats = _tracker_stats(hosts, torrent)
    assert stats["announces"] >= PEERS * 3
    traffic = {"bytes_in": stats["tracker_bytes_in"], "bytes_out": stats["tracker_bytes_out"]}
    summary = summarize_swarm(out, torrent=torrent, tracker_traffic=traffic, plots=False)
    assert summary["finished"] == PEERS
    assert summary["bandwidth"]["tracker_bytes"] > 0
    assert summary["bandwidth"]["p2p_bytes_sent"] > 0
    assert summary["test_accuracy_mean"] > 0.5


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text()[-chars:] if path.exists() else f"(no {path.name})"


# -- faults between the hosts ----------------------------------------------------------------

FAULT_ROUNDS = 5
FAULT_DEADLINE_S = 5.0
"""Exchange deadline of the fault runs: what waiting on a partitioned neighbour costs a round."""
FAULT_TABLE = "fedtorrent_faults"
"""The nftables table that carries a fault inside a peer's namespace (gone with the namespace)."""
LOSS_PERCENT = 5
"""Packets dropped at random on every peer link, each way (about twice that per peer-to-peer
path, which crosses two links)."""
RATE_BITS = 10_000_000
BURST_BYTES = 10 * 1024
"""Token bucket of the rate limit (tbf), on both ends of every peer link."""
FAULTS = ("none", "loss", "rate", "partition")


def _run(*command: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=20, check=False
    )


def _fault_unavailable(hosts: Hosts, fault: str) -> str | None:
    """Why ``fault`` cannot be made in these namespaces, or None when it can."""
    ns = hosts.tracker_ns
    if fault in ("loss", "partition"):
        if shutil.which("nft") is None:
            return "nftables' `nft` command is not installed (apt-get install nftables)"
        probe = _run("ip", "netns", "exec", ns, "nft", "add", "table", "inet", "ftprobe")
        if probe.returncode != 0:
            return f"nftables does not work in a namespace here: {probe.stderr.strip()}"
        _run("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "ftprobe")
    if fault == "rate":
        if shutil.which("tc") is None:
            return "iproute2's `tc` command is not installed"
        probe = _run("tc", "-n", ns, "qdisc", "add", "dev", "v0", "root", *_tbf())
        if probe.returncode != 0:
            return f"the tbf queueing discipline is not available: {probe.stderr.strip()}"
        _run("tc", "-n", ns, "qdisc", "del", "dev", "v0", "root")
    return None


def _tbf() -> list[str]:
    return ["tbf", "rate", f"{RATE_BITS // 1_000_000}mbit", "burst", f"{BURST_BYTES // 1024}kb",
            "latency", "200ms"]  # fmt: skip


def _nft(ns: str, script: str) -> None:
    done = _run("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=script)
    assert done.returncode == 0, f"nft in {ns}: {done.stderr.strip()}\n{script}"


def _drop_rules(input_match: str, output_match: str) -> str:
    """An nftables table that drops (and counts) what the two matches select, each way."""
    return f"""
table inet {FAULT_TABLE} {{
    chain input {{
        type filter hook input priority 0; policy accept;
        {input_match} counter drop
    }}
    chain output {{
        type filter hook output priority 0; policy accept;
        {output_match} counter drop
    }}
}}
"""


def _dropped(ns: str) -> int:
    """Packets the fault table of ``ns`` dropped so far."""
    listed = _run("ip", "netns", "exec", ns, "nft", "list", "table", "inet", FAULT_TABLE)
    assert listed.returncode == 0, listed.stderr
    return sum(int(n) for n in re.findall(r"counter packets (\d+)", listed.stdout))


def _tcp_retransmits(ns: str) -> int:
    """TCP segments the kernel re-sent in ``ns`` (``RetransSegs`` of its ``/proc/net/snmp``)."""
    text = _run("ip", "netns", "exec", ns, "cat", "/proc/net/snmp").stdout
    names, values = (line.split()[1:] for line in text.splitlines() if line.startswith("Tcp:"))
    return int(values[names.index("RetransSegs")])


def _overlimits(ns: str, dev: str) -> int:
    """Packets the rate limit on ``dev`` held back (tbf's ``overlimits``)."""
    shown = _run("tc", "-n", ns, "-s", "qdisc", "show", "dev", dev).stdout
    return sum(int(n) for n in re.findall(r"overlimits (\d+)", shown))


def _complete_records(path: Path) -> list[dict[str, Any]]:
    """The records a running peer has written so far (whole lines only)."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def _poll_records(
    path: Path, process: subprocess.Popen[str], until: Any, what: str, timeout: float
) -> dict[str, Any]:
    """The first record of ``path`` that ``until`` accepts, polled while ``process`` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = next((r for r in _complete_records(path) if until(r)), None)
        if found is not None:
            return found
        if process.poll() is not None:
            break
        time.sleep(0.1)  # a poll of the file, bounded by the deadline
    pytest.fail(f"no record of {what} within {timeout} s: {_tail(path.parent / 'console.log')}")


def _partition_until_it_shows(
    hosts: Hosts, out: Path, peers: list[subprocess.Popen[str]]
) -> tuple[int, int]:
    """Cut peer 0 off the other peers (the tracker stays reachable) once it finished a round;
    heal the link as soon as one of its rounds timed out on a neighbour.

    Returns that round and the packets the partition dropped.
    """
    ns, metrics = hosts.peer_ns[0], peer_folder(out, 0) / "metrics.jsonl"
    first = _poll_records(metrics, peers[0], lambda r: True, "peer 0's first round", 150)
    others = ", ".join(hosts.peer_ip(i) for i in range(1, PEERS))
    _nft(ns, _drop_rules(f"ip saddr {{ {others} }}", f"ip daddr {{ {others} }}"))
    try:
        cut = _poll_records(
            metrics,
            peers[0],
            lambda r: r["round"] > first["round"] and r["failed"].get("timeout", 0) > 0,
            "peer 0 timing out on a partitioned neighbour",
            120,
        )
    finally:
        dropped = _dropped(ns)
        _nft(ns, f"delete table inet {FAULT_TABLE}")
    return int(cut["round"]), dropped


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(360)
@pytest.mark.parametrize("fault", FAULTS)
def test_the_swarm_finishes_through_faults_between_hosts_and_reports_their_cost(
    hosts: Hosts, tmp_path: Path, fault: str
) -> None:
    """Loss, a rate limit or a healing partition on the links; every peer finishes every round.

    Each run prints its figures (``-s`` shows them): wall time, the summary's retries, failed
    requests and time lost, and what the kernel saw of the fault.
    """
    reason = _fault_unavailable(hosts, fault)
    if reason is not None:
        pytest.skip(reason)
    torrent_path = _swarm_torrent(tmp_path, dataset="mnist", rounds=FAULT_ROUNDS)
    torrent = load_torrent(torrent_path)
    out = tmp_path / "run"
    if fault == "loss":
        rules = _drop_rules(
            f'iifname "eth0" numgen random mod 100 < {LOSS_PERCENT}',
            f'oifname "eth0" numgen random mod 100 < {LOSS_PERCENT}',
        )
        for ns in hosts.peer_ns:
            _nft(ns, rules)
    if fault == "rate":
        for i, ns in enumerate(hosts.peer_ns):  # uplink and downlink of every peer
            subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", *_tbf()],
                           check=True, timeout=20)  # fmt: skip
            subprocess.run(["tc", "-n", hosts.tracker_ns, "qdisc", "add", "dev", f"v{i}",
                            "root", *_tbf()], check=True, timeout=20)  # fmt: skip
    peers = _start_swarm(hosts, torrent_path, out, exchange_timeout=FAULT_DEADLINE_S)
    started = time.monotonic()
    seen: dict[str, Any] = {}
    if fault == "partition":
        seen["partitioned_round"], seen["dropped"] = _partition_until_it_shows(hosts, out, peers)
    _wait_for_peers(peers, out, timeout=240)
    wall = time.monotonic() - started
    if fault == "loss":
        seen["dropped"] = sum(_dropped(ns) for ns in hosts.peer_ns)
    seen["tcp_retransmits"] = sum(_tcp_retransmits(ns) for ns in hosts.peer_ns)
    if fault == "rate":
        seen["overlimits"] = sum(_overlimits(ns, "eth0") for ns in hosts.peer_ns)

    summary = summarize_swarm(out, torrent=torrent, tracker_traffic=None, plots=False)
    records = [read_records(peer_folder(out, i) / "metrics.jsonl") for i in range(PEERS)]
    faults = summary["faults"]
    figures = {
        "fault": fault,
        "wall_s": round(wall, 1),
        "retries": faults["retries"],
        "failed": faults["failed"],
        "time_lost_s": round(faults["time_lost_s"], 2),
        "worst_round_lost_s": round(
            max(p["worst_round_lost_s"] for p in faults["per_peer"].values()), 2
        ),
        "test_accuracy_mean": summary["test_accuracy_mean"],
        **seen,
    }
    print(f"\nnetns fault figures: {json.dumps(figures)}")

    assert summary["finished"] == PEERS
    for i, peer_records in enumerate(records):
        assert [r["round"] for r in peer_records] == list(range(1, FAULT_ROUNDS + 1)), i
        assert any(r["heard_from"] for r in peer_records), f"peer {i} never heard anyone"
    assert summary["test_accuracy_mean"] > 0.8
    # "none" is the control: its figures are what a healthy run costs on this machine (a peer
    # starved of CPU can still fall a round behind and cost a neighbour time, so no bound here).
    if fault == "loss":
        assert seen["dropped"] > 0 and seen["tcp_retransmits"] > 0, figures
    if fault == "rate":
        assert seen["overlimits"] > 0, figures
        # Every full state crossed a 10 Mbit/s link: none came faster than the bucket allows.
        floor_s = (torrent.session.state_size - BURST_BYTES) * 8 / RATE_BITS
        fastest = min(s for peer in records for r in peer for s in r["rtts"].values())
        assert fastest >= 0.8 * floor_s, (fastest, floor_s)
    if fault == "partition":
        assert seen["dropped"] > 0 and faults["failed"].get("timeout", 0) > 0, figures
        cut = next(r for r in records[0] if r["round"] == seen["partitioned_round"])
        assert cut["time_lost_s"] >= 0.5, cut  # it waited on the cut-off neighbours
        healed = [r for r in records[0] if r["round"] > seen["partitioned_round"]]
        assert any(r["heard_from"] for r in healed), "peer 0 never heard anyone after the heal"
