"""Parameter exchange over loopback: fedtorrent's ZeroMQ transport against bare ZeroMQ.

For each model size, in one run and interleaved repetition by repetition:

- raw:      a bare ROUTER/DEALER pair; the DEALER asks, the ROUTER answers with the payload bytes
            as one zero-copy frame, the DEALER receives it zero-copy. No checks at all.
- fetch:    ``ZmqTransport.fetch(..., like_state=...)``: request on a fresh socket, header checks,
            payload in pieces hashed as they arrive, sha256 verified, safetensors parsed and
            checked against the model (keys, shapes, dtypes, finite).
- publish:  ``encode_state`` + ``wire.encode_message`` (serialise + sha256) + ``publish``: paid
            once per round by the serving peer, however many peers fetch.

Ratios are raw time / our time (so 1.0 = as fast as bare ZeroMQ), from medians; ``best`` uses
each side's fastest repetition, the least disturbed by other processes. ``full`` counts publish +
fetch, as if every publish were fetched once. ``cpu`` columns are the CPU time of the whole
process (both ends, every thread) per exchange, median: on a machine with C free cores an
exchange cannot take less than cpu / C.

With ``--curve`` both transports run CurveZMQ (keys from ``PeerIdentity``, the server's ZAP
handler admitting the client's key, as in a closed swarm) while raw stays plain, so ``fetch/raw``
shows what encryption costs; results go to ``results/transport_curve.json``.

    .venv/bin/python benchmarks/transport.py [--sizes 1 10 100] [--repeats 31] [--curve]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
import zmq

from fedtorrent.net import wire
from fedtorrent.net.identity import PeerIdentity
from fedtorrent.net.transport import Endpoint, TransportConfig, ZmqTransport
from fedtorrent.state import encode_state

INFO_HASH = "5e" * 32
MB = 1 << 20


def make_state(size_mb: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """A model-like state: a few float32 tensors totalling ``size_mb`` MiB."""
    gen = torch.Generator().manual_seed(seed)
    floats = int(size_mb * MB) // 4
    parts = [floats // 2, floats // 4, floats // 8]
    parts.append(floats - sum(parts))
    return {f"layer{i}.weight": torch.randn(n, generator=gen) for i, n in enumerate(parts)}


class RawPair:
    """Bare ZeroMQ: same socket types, same loopback, one context per side, no checks."""

    def __init__(self) -> None:
        self.server_ctx: zmq.Context[Any] = zmq.Context(io_threads=1)
        self.client_ctx: zmq.Context[Any] = zmq.Context(io_threads=1)
        self.router = self.server_ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.dealer = self.client_ctx.socket(zmq.DEALER)
        self.dealer.linger = 0
        self.dealer.connect(f"tcp://127.0.0.1:{port}")
        self.payload: bytes = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            identity, request = self.router.recv_multipart()
            if request == b"stop":
                return
            self.router.send_multipart([identity, self.payload], copy=False)

    def exchange(self) -> float:
        start = time.perf_counter()
        self.dealer.send(b"get")
        frame = self.dealer.recv(copy=False)
        elapsed = time.perf_counter() - start
        assert len(frame.buffer) == len(self.payload)
        return elapsed

    def close(self) -> None:
        self.dealer.send(b"stop")
        self.thread.join()
        self.dealer.close()
        self.router.close()
        self.client_ctx.term()
        self.server_ctx.term()


def measure(
    size_mb: float, repeats: int, raw: RawPair, server: ZmqTransport, client: ZmqTransport
) -> dict[str, Any]:
    state = make_state(size_mb)
    endpoint = Endpoint(
        peer_id="server", address=server.address, public_key=server.config.curve_public_key
    )
    times: dict[str, list[float]] = {"raw": [], "publish": [], "fetch": []}
    cpu: dict[str, list[float]] = {"raw": [], "fetch": []}
    for rep in range(repeats + 1):  # repetition 0 warms up and is dropped
        start = time.perf_counter()
        frames = wire.encode_message(
            encode_state(state), info_hash=INFO_HASH, sender="server", round=rep, num_examples=1
        )
        server.publish(frames)
        publish_s = time.perf_counter() - start
        raw.payload = frames[1]
        cpu_start = time.process_time()
        raw_s = raw.exchange()
        raw_cpu = time.process_time() - cpu_start
        start, cpu_start = time.perf_counter(), time.process_time()
        reply = client.fetch(endpoint, round=rep, timeout=60.0, like_state=state)
        fetch_s = time.perf_counter() - start
        fetch_cpu = time.process_time() - cpu_start
        assert reply.state is not None and torch.equal(
            reply.state["layer0.weight"], state["layer0.weight"]
        )
        if rep:
            times["raw"].append(raw_s)
            times["publish"].append(publish_s)
            times["fetch"].append(fetch_s)
            cpu["raw"].append(raw_cpu)
            cpu["fetch"].append(fetch_cpu)
        del reply
    payload_bytes = len(frames[1])
    sha_s = min(_timed(lambda: hashlib.sha256(frames[1]).digest()) for _ in range(3))
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "size_mb": size_mb,
        "payload_bytes": payload_bytes,
        "median_s": median,
        "min_s": {k: min(v) for k, v in times.items()},
        "cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
        "raw_mb_s": payload_bytes / MB / median["raw"],
        "fetch_mb_s": payload_bytes / MB / median["fetch"],
        "ratio_fetch": median["raw"] / median["fetch"],
        "ratio_full": median["raw"] / (median["fetch"] + median["publish"]),
        "ratio_fetch_best": min(times["raw"]) / min(times["fetch"]),
        "sha256_s": sha_s,
    }


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 100])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--curve", action="store_true", help="encrypt the transport's links")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    name = "transport_curve.json" if args.curve else "transport.json"
    out: Path = args.out or Path(__file__).parent / "results" / name

    load_before = os.getloadavg()[0]
    raw = RawPair()
    server_keys: dict[str, Any] = {}
    client_keys: dict[str, Any] = {}
    if args.curve:
        server_id, client_id = PeerIdentity.generate(), PeerIdentity.generate()
        client_keys = {
            "curve_secret_key": client_id.curve_secret,
            "curve_public_key": client_id.curve_public,
        }
        server_keys = {
            "curve_secret_key": server_id.curve_secret,
            "curve_public_key": server_id.curve_public,
            "curve_allow": frozenset({client_id.curve_public}),
        }
    server = ZmqTransport(TransportConfig(info_hash=INFO_HASH, peer_id="server", **server_keys))
    client = ZmqTransport(TransportConfig(info_hash=INFO_HASH, peer_id="client", **client_keys))
    with server, client:
        rows = [measure(size, args.repeats, raw, server, client) for size in args.sizes]
    raw.close()

    print(
        f"{'MB':>6} {'raw ms':>8} {'fetch ms':>9} {'publish ms':>11} {'raw MB/s':>9} "
        f"{'ours MB/s':>10} {'fetch/raw':>10} {'best':>6} {'full/raw':>9} {'sha256 ms':>10} "
        f"{'cpu raw':>8} {'cpu fetch':>10}"
    )
    for r in rows:
        m = r["median_s"]
        print(
            f"{r['size_mb']:>6g} {m['raw'] * 1e3:>8.1f} {m['fetch'] * 1e3:>9.1f} "
            f"{m['publish'] * 1e3:>11.1f} {r['raw_mb_s']:>9.0f} {r['fetch_mb_s']:>10.0f} "
            f"{r['ratio_fetch']:>10.2f} {r['ratio_fetch_best']:>6.2f} {r['ratio_full']:>9.2f} "
            f"{r['sha256_s'] * 1e3:>10.1f} {r['cpu_s']['raw'] * 1e3:>8.1f} "
            f"{r['cpu_s']['fetch'] * 1e3:>10.1f}"
        )
    result = {
        "benchmark": "transport",
        "command": "python benchmarks/transport.py "
        + " ".join(["--sizes", *map(str, args.sizes), "--repeats", str(args.repeats)])
        + (" --curve" if args.curve else ""),
        "curve": args.curve,
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1m_before": load_before,
            "load_avg_1m_after": os.getloadavg()[0],
            "python": platform.python_version(),
            "libzmq": zmq.zmq_version(),
            "pyzmq": zmq.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
