"""Ledger rows a serving peer writes when one client floods it with valid requests.

One real peer (digits, logistic regression, CurveZMQ on, a real HTTP tracker on 127.0.0.1)
runs its rounds alone and lingers on its final state; a client with its own CurveZMQ key then
fetches that state ``--requests`` times back to back, each fetch on a new connection as the
peer's own fetcher makes them. Prints how many fetches were served and refused and how many
rows the peer's ledger holds afterwards.

    .venv/bin/python benchmarks/ledger_flood.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import zmq

from fedtorrent.cli.net import create
from fedtorrent.config import TrackerConfig
from fedtorrent.errors import NetworkError
from fedtorrent.ledger import Ledger, ledger_path
from fedtorrent.net.tracker.server import BackgroundTracker
from fedtorrent.net.transport import Endpoint, PeerRefusedError, TransportConfig, ZmqTransport
from fedtorrent.node.peer import Peer, PeerConfig


def flood(requests: int, root: Path) -> None:
    """Run the peer, flood it, print the outcome and its ledger rows."""
    tracker_config = TrackerConfig(port=0, db_path=root / "tracker.db", interval=30, rate_limit=0)
    with BackgroundTracker(tracker_config) as tracker:
        torrent = root / "session.torrent"
        create(output=torrent, tracker=f"{tracker.url}/announce", dataset="digits", nodes=3,
               cohort=2, rounds=3, mixing="fixed", batch_size=32, allow_key=[])  # fmt: skip
        config = PeerConfig(torrent=torrent, out_dir=root / "peer-0", node_index=0, num_nodes=3,
                            exchange_timeout=0.3, linger=120.0)  # fmt: skip
        peer = Peer(config)
        peer.start()
        runner = threading.Thread(target=peer.run)
        runner.start()
        ready = threading.Event()
        while peer.transport.serving_round < 3 and runner.is_alive():
            ready.wait(0.01)  # until it serves its final state
        public, secret = zmq.curve_keypair()
        client = TransportConfig(info_hash=peer.info_hash, peer_id="flooder",
                                 curve_public_key=public, curve_secret_key=secret)  # fmt: skip
        target = Endpoint(peer.peer_id, peer.address, public_key=peer.identity.curve_public)
        outcomes: Counter[str] = Counter()
        started = time.monotonic()
        with ZmqTransport(client) as flooder:
            for _ in range(requests):
                try:
                    flooder.fetch(target, round=3, timeout=5.0)
                    outcomes["served"] += 1
                except PeerRefusedError as exc:
                    outcomes[exc.kind] += 1
                except NetworkError as exc:
                    outcomes[type(exc).__name__] += 1
        seconds = time.monotonic() - started
        peer.request_stop()
        runner.join(60)
        peer.close()
    with Ledger(ledger_path(peer.out_dir, peer.peer_id), peer.identity, owner=peer.peer_id) as led:
        entries = led.entries()
    sent = sum(e.direction == "sent" for e in entries)
    print(f"{requests} requests in {seconds:.2f} s: {dict(outcomes)}")
    rejections = dict(peer.transport.stats.rejections())
    print(f"ledger rows: {len(entries)} ({sent} sent); rejections {rejections}")


def main() -> None:
    """Parse the command line and run the flood in a temporary folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        flood(args.requests, Path(folder))


if __name__ == "__main__":
    main()
