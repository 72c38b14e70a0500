"""Announce throughput and latency of the tracker with 1,000 and 10,000 registered peers.

The tracker runs as its own process (``fedtorrent tracker``, SQLite write-behind on, rate limit
and per-address caps off, since all load comes from one address); the load comes from another
process: ``wrk`` when installed (``apt-get install wrk``), else a Python aiohttp client. Each
measured request is a re-announce of one of the registered peers in rotation, asking for 20 peers,
so every answer samples the full swarm.

    .venv/bin/python benchmarks/tracker_load.py [--peers 1000 10000] [--duration 10] [--signed]

``--signed`` makes every peer announce an Ed25519 key (so each id is key-bound) and every request
carry ``pubkey``, ``ts`` and ``sig`` as ``fedtorrent peer`` sends them. Re-announces that change
nothing are not verified, so this measures what signing costs the tracker on its hot path.

Prints a table and writes benchmarks/results/tracker_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

INFO_HASH = "f" * 64
RESULTS = Path(__file__).parent / "results" / "tracker_load.json"
WRK_SCRIPT = r"""
local n = tonumber(os.getenv("FT_PEERS"))
local info_hash = os.getenv("FT_INFO_HASH")
local extra = os.getenv("FT_EXTRA") or ""
local counter = 0
request = function()
  counter = counter + 1
  local i = counter % n
  return wrk.format("GET", "/announce?info_hash=" .. info_hash .. "&peer_id=peer-" .. i
    .. "&port=" .. (10000 + i % 50000) .. "&round=" .. counter .. "&numwant=20"
    .. "&accuracy=0.5&bytes_sent=" .. counter .. "&bytes_received=" .. counter .. extra)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('FTJSON {"requests": %d, "duration_s": %f, "non_2xx": %d, '
    .. '"socket_errors": %d, "p50_ms": %f, "p99_ms": %f, "max_ms": %f}\n',
    summary.requests, summary.duration / 1e6, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3))
end
"""


def announce_path(i: int, counter: int) -> str:
    return (
        f"/announce?info_hash={INFO_HASH}&peer_id=peer-{i}&port={10000 + i % 50000}"
        f"&round={counter}&numwant=20&accuracy=0.5&bytes_sent={counter}&bytes_received={counter}"
        + os.environ.get("FT_EXTRA", "")
    )


def signed_extra() -> str:
    """``&pubkey=..&ts=..&sig=..`` of one key, signed over peer 0's announce (for --signed)."""
    from fedtorrent.net.identity import PeerIdentity, announce_message

    identity = PeerIdentity.generate()
    key = identity.public_key_hex
    ts = time.time_ns() // 1000
    message = announce_message(
        info_hash=INFO_HASH, peer_id="peer-0", event="", ip="", port=10000, pubkey=key, ts=ts
    )
    return f"&pubkey={key}&ts={ts}&sig={identity.sign(message).hex()}"


def start_tracker(workdir: Path) -> tuple[subprocess.Popen[str], str]:
    command = [
        sys.executable, "-c", "from fedtorrent.cli import main; main()", "tracker",
        "--port", "0", "--rate-limit", "0", "--db", str(workdir / "tracker.sqlite"),
        "--max-peers", "100000", "--interval", "300",
        # All load comes from 127.0.0.1: lift the per-address caps meant for the open internet.
        "--max-peers-per-address", "0", "--max-connections-per-address", "0",
    ]  # fmt: skip
    tracker = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert tracker.stdout is not None
    deadline = time.monotonic() + 30
    for line in tracker.stdout:
        if line.startswith("tracker listening on "):
            return tracker, line.split()[3]
        if time.monotonic() > deadline:
            break
    tracker.kill()
    raise RuntimeError("tracker did not start")


async def register(url: str, peers: int) -> None:
    """Announce every peer once (started), 64 at a time; not measured."""
    queue = iter(range(peers))
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            for i in queue:
                async with session.get(url + announce_path(i, 0) + "&event=started") as response:
                    assert response.status == 200, await response.text()
                    await response.read()

        await asyncio.gather(*(worker() for _ in range(64)))
        async with session.get(f"{url}/healthz") as response:
            health = await response.json()
    assert health["peers"] == peers, health


def load_with_wrk(url: str, peers: int, *, duration: int, connections: int) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    env = {**os.environ, "FT_PEERS": str(peers), "FT_INFO_HASH": INFO_HASH}
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "-s", script.name, url]
    output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    os.unlink(script.name)
    line = next(x for x in output.splitlines() if x.startswith("FTJSON "))
    stats = json.loads(line.removeprefix("FTJSON "))
    stats["announces_per_s"] = stats["requests"] / stats["duration_s"]
    return stats


async def python_load(url: str, peers: int, duration: float, connections: int) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    counter = 0
    stop = time.perf_counter() + duration
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal counter, errors
            while time.perf_counter() < stop:
                counter += 1
                started = time.perf_counter()
                async with session.get(url + announce_path(counter % peers, counter)) as response:
                    await response.read()
                    errors += response.status != 200
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "requests": len(latencies),
        "duration_s": elapsed,
        "non_2xx": errors,
        "socket_errors": 0,
        "p50_ms": cuts[49] * 1e3,
        "p99_ms": cuts[98] * 1e3,
        "max_ms": latencies[-1] * 1e3,
        "announces_per_s": len(latencies) / elapsed,
    }


def load_with_python(url: str, peers: int, *, duration: int, connections: int) -> dict[str, float]:
    """Run the aiohttp load generator in a child process (never in the tracker's)."""
    command = [
        sys.executable,
        __file__,
        "--child",
        url,
        str(peers),
        str(duration),
        str(connections),
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure(peers: int, *, loader: str, duration: int, connections: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        tracker, url = start_tracker(Path(tmp))
        try:
            asyncio.run(register(url, peers))
            run = load_with_wrk if loader == "wrk" else load_with_python
            stats = run(url, peers, duration=duration, connections=connections)
            metrics = asyncio.run(fetch_text(f"{url}/metrics"))
        finally:
            tracker.send_signal(signal.SIGTERM)
            tracker.wait(timeout=30)
    rejected = [
        line for line in metrics.splitlines() if line.startswith("fedtorrent_tracker_rejected")
    ]
    return {
        "peers": peers,
        "loader": loader,
        "connections": connections,
        **stats,
        "rejected": rejected,
    }


async def fetch_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        url, peers, duration, connections = sys.argv[2:6]
        stats = asyncio.run(python_load(url, int(peers), float(duration), int(connections)))
        print(json.dumps(stats))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--loader", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--signed", action="store_true", help="key-bound peers, signed requests")
    args = parser.parse_args()
    os.environ["FT_EXTRA"] = signed_extra() if args.signed else ""
    loader = args.loader
    if loader == "auto":
        loader = "wrk" if shutil.which("wrk") else "python"
    rows = [
        measure(n, loader=loader, duration=args.duration, connections=args.connections)
        for n in args.peers
    ]
    print(
        f"{'peers':>7} {'loader':>7} {'announces/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
    )
    for row in rows:
        errors = int(row["non_2xx"]) + int(row["socket_errors"])  # type: ignore[call-overload]
        print(
            f"{row['peers']:>7} {row['loader']:>7} {row['announces_per_s']:>12.0f} "
            f"{row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} {errors:>7}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "tracker_load",
        "command": "python benchmarks/tracker_load.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "platform": platform.platform(),
        },
        "duration_s": args.duration,
        "signed": args.signed,
        "results": rows,
    }
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
