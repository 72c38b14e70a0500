"""The same MNIST swarm announcing to Debian's opentracker and to our tracker (issue 13, part 4).

    FEDTORRENT_DATA=../shared/data .venv/bin/python experiments/opentracker_swarm.py \\
        [--peers 6] [--rounds 5] [--work runs/opentracker]

One session (``fedtorrent create --dataset mnist --model logreg --nodes N --cohort 3 --rounds R``),
two real swarms of N ``fedtorrent peer`` processes on it: one on a real ``opentracker`` (peers
found by address, keys learned by hello), one on our tracker (keys announced). Prints and writes
``<work>/opentracker.json``: each swarm's mean test accuracy, peers finished and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedtorrent.cli.net import create
from fedtorrent.errors import TrackerError
from fedtorrent.net.torrent import load_torrent
from fedtorrent.net.tracker.client import TrackerClient
from fedtorrent.node.swarm import SwarmConfig, run_swarm


def start_opentracker(folder: Path, info_hash: str) -> tuple[subprocess.Popen[bytes], str]:
    """opentracker on a free loopback port, whitelisting ``info_hash``; returns it and its URL."""
    binary = shutil.which("opentracker")
    if binary is None:
        sys.exit("opentracker is not installed (apt-get install opentracker)")
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    (folder / "whitelist").write_text(info_hash[:40] + "\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [binary, "-i", "127.0.0.1", "-p", str(port), "-P", str(port)]
    process = subprocess.Popen(
        [*command, "-d", str(folder), "-w", "whitelist"], cwd=folder, stdout=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}/announce"
    probe = TrackerClient(url, timeout=2, retries=0, flavour="bittorrent")
    deadline = time.monotonic() + 20
    while True:
        try:
            probe.announce(info_hash, "probe", port=1, event="started")
            probe.announce(info_hash, "probe", port=1, event="stopped")
            return process, url
        except TrackerError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def main() -> None:
    """Run both swarms and report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("runs/opentracker"))
    args = parser.parse_args()
    data = Path(os.environ.get("FEDTORRENT_DATA", "../shared/data"))
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    torrent = args.work / "mnist.torrent"
    create(
        output=torrent,
        dataset="mnist",
        model="logreg",
        nodes=args.peers,
        rounds=args.rounds,
        cohort=3,
    )  # type: ignore[arg-type]
    process, url = start_opentracker(args.work / "opentracker", load_torrent(torrent).info_hash)
    results = {}
    try:
        for name, tracker in (("opentracker", url), ("fedtorrent", None)):
            started = time.monotonic()
            config = SwarmConfig(
                torrent=torrent, out=args.work / f"swarm-{name}", peers=args.peers, data_dir=data,
                tracker=tracker, exchange_timeout=60,
            )  # fmt: skip
            summary = run_swarm(config, timeout=600, plots=False)
            results[name] = {
                "test_accuracy_mean": summary["test_accuracy_mean"],
                "finished": summary["finished"],
                "wall_s": round(time.monotonic() - started, 1),
            }
    finally:
        process.terminate()
        process.wait(timeout=10)
    results["difference_points"] = 100 * (
        results["opentracker"]["test_accuracy_mean"] - results["fedtorrent"]["test_accuracy_mean"]
    )
    document = {"peers": args.peers, "rounds": args.rounds, "results": results}
    (args.work / "opentracker.json").write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
