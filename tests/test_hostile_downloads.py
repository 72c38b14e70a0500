"""Hostile servers and hostile torrents against the real ``fedtorrent`` command, in a subprocess.

A small socket server on 127.0.0.1 misbehaves in one way per path (a bad status line, a 70 kB
header line, 150 headers, a bad chunk size, endless ``100 Continue``, a body at 1 byte/s,
headers that never end, a huge ``Content-Length``, a redirect loop, a reset...). Each case runs
``fedtorrent show URL`` and ``fedtorrent peer URL`` and must end with exit status 2 and one line
on stderr (no traceback) within the download deadline plus one second, the child's peak memory
(``ru_maxrss`` from ``wait4``) under 300 MB. Hostile torrent files (a creation date of 10^30,
model arguments nested 30,000 deep, a 1 GB model, escape sequences) go through ``show`` and
``peer`` the same way. Run with ``-s`` to see the measured table.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import fastbencode
import pytest

from fedtorrent.config import DataConfig, MixingConfig, ModelConfig, TrainConfig
from fedtorrent.data.datasets import download_file
from fedtorrent.errors import DataError
from fedtorrent.net.torrent import Session, Torrent

DEADLINE_S = 2.0
SLACK_S = 1.0
MAX_RSS_MB = 300
SRC = str(Path(__file__).resolve().parents[1] / "src")


# -- a misbehaving server ------------------------------------------------------------------------


Behaviour = Callable[[socket.socket, threading.Event], None]


def _status(body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode("latin-1") + body


def _repeat(chunk: bytes, every: float) -> Behaviour:
    def behave(conn: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            conn.sendall(chunk)
            stop.wait(every)

    return behave


def _then(head: bytes, rest: Behaviour) -> Behaviour:
    def behave(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(head)
        rest(conn, stop)

    return behave


def _once(payload: bytes) -> Behaviour:
    return lambda conn, stop: conn.sendall(payload)


def _reset(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial")
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


def _flood(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")  # no length: read until close, or the size cap
    block = b"x" * 65536
    while not stop.is_set():
        conn.sendall(block)


BEHAVIOURS: dict[str, Behaviour] = {
    "bad-status-line": _once(b"SPDY/9 banana\r\n\r\n"),
    "header-line-70kB": _once(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"),
    "150-headers": _once(
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150)) + b"\r\n"
    ),
    "bad-chunk-size": _once(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
    ),
    "endless-100-continue": _repeat(b"HTTP/1.1 100 Continue\r\n\r\n", 0.05),
    "body-1-byte-per-s": _then(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", _repeat(b"d", 1.0)
    ),
    "headers-never-end": _then(b"HTTP/1.1 200 OK\r\n", _repeat(b"X-More: yes\r\n", 0.2)),
    "status-line-1-byte-per-0.1s": _repeat(b"H", 0.1),
    "silent": _repeat(b"", 0.5),
    "content-length-1e12": _once(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\nd8:"),
    "no-length-flood": _flood,
    "short-body": _once(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\nd8:announce"),
    "bad-content-length": _once(b"HTTP/1.1 200 OK\r\nContent-Length: -7\r\n\r\nnot bencode"),
    "redirect-loop": _once(b"HTTP/1.1 302 Found\r\nLocation: /redirect-loop\r\n\r\n"),
    "error-status-with-escapes": _once(
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 40\r\n\r\n"
        + b'{"failure reason":"\\u001b[2J\\rgone  "}'.ljust(40)
    ),
    "reset": _reset,
    "closed-at-once": _once(b""),
}


class HostileServer:
    """One thread per connection; the request path picks the behaviour; ``stop`` ends them all."""

    def __init__(self, torrents: dict[str, bytes]) -> None:
        self.torrents = torrents
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.threads: list[threading.Thread] = []

    def __enter__(self) -> HostileServer:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self.threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.listener.close()
        for thread in self.threads:
            thread.join(timeout=5)

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(5)
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 65536:
                    request += conn.recv(4096) or b"\r\n\r\n"
                path = (
                    request.split(b" ", 2)[1].decode("latin-1") if request.count(b" ") >= 2 else "/"
                )
                name = path.strip("/").split("/")[0]
                if name in self.torrents:
                    conn.sendall(_status(self.torrents[name]))
                else:
                    BEHAVIOURS.get(name, _once(b"HTTP/1.1 404 Nope\r\n\r\n"))(conn, self.stop)
            except OSError:
                pass  # the client hung up: exactly what it should do


# -- running the real command ---------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    """From the interpreter's start to its exit (imports included, its own start-up not)."""
    wall: float
    """From spawning the process to its end, as seen by the test (printed, not asserted: on a
    loaded machine it mostly measures the scheduler)."""
    max_rss_mb: float


ROWS: list[str] = []


_CHILD = """
import time
start = time.monotonic()
import atexit, os, sys
def peak():
    with open("/proc/self/status") as status, open(os.environ["PEAK_FILE"], "w") as out:
        hwm = next(line for line in status if line.startswith("VmHWM:")).split()[1]
        out.write(f"{hwm} {time.monotonic() - start}")
atexit.register(peak)
from fedtorrent.cli import main
sys.argv[0] = "fedtorrent"
main()
"""


def run_cli(*args: str, cwd: Path, limit: float = 60.0) -> Run:
    """``fedtorrent ARGS`` in a fresh process, with its wall time and its own peak memory."""
    peak_file = cwd / ".peak"
    env = {**os.environ, "PYTHONPATH": SRC, "PEAK_FILE": str(peak_file)}
    try:
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, *args],
            capture_output=True,
            cwd=cwd,
            env=env,
            timeout=limit,
            check=False,
        )
        wall = time.monotonic() - start
        peak_kb, seconds = peak_file.read_text().split()
    finally:
        peak_file.unlink(missing_ok=True)
    return Run(
        done.returncode,
        done.stdout.decode(errors="replace"),
        done.stderr.decode(errors="replace"),
        float(seconds),
        wall,
        int(peak_kb) / 1024,
    )


def assert_one_line_error(run: Run, label: str, *, within: float) -> None:
    ROWS.append(
        f"{label:<42} exit {run.returncode} {run.seconds:5.2f} s (wall {run.wall:5.2f}) "
        f"{run.max_rss_mb:6.1f} MB  "
        f"{run.stderr.strip()[:90]}"
    )
    print(ROWS[-1])
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "Traceback" not in run.stderr and "\x1b" not in run.stderr and "\r" not in run.stderr
    assert run.seconds <= within, f"{label} took {run.seconds:.2f} s"
    assert run.max_rss_mb < MAX_RSS_MB


# -- hostile torrents -----------------------------------------------------------------------------


def session_bytes(**changes: object) -> Session:
    values: dict[str, object] = {
        "name": "hostile",
        "model": ModelConfig("logreg", {}),
        "data": DataConfig(dataset="digits", num_nodes=3),
        "train": TrainConfig(),
        "mixing": MixingConfig(rule="fixed"),
        "rounds": 2,
        "cohort_size": 2,
        "state_sha256": hashlib.sha256(b"s").hexdigest(),
        "state_size": 2600 + 200,
    }
    values.update(changes)
    return Session(**values)  # type: ignore[arg-type]


def base_meta() -> dict[bytes, object]:
    torrent = Torrent(announce="http://127.0.0.1:9/announce", session=session_bytes())
    return fastbencode.bdecode(torrent.to_bytes())  # type: ignore[no-any-return]


def hostile_torrents() -> dict[str, bytes]:
    """Torrents a stranger could write, each wrong in a way the reader must bound."""
    date = base_meta()
    date[b"creation date"] = 10**30
    nested = base_meta()
    nested[b"info"][b"model"][b"kwargs"] = b'{"h":' + b"[" * 30_000 + b"]" * 30_000 + b"}"  # type: ignore[index]
    huge = base_meta()
    huge[b"info"][b"model"] = {b"kwargs": b'{"hidden":[3300000]}', b"name": b"mlp"}  # type: ignore[index]
    count = base_meta()
    count[b"info"][b"data"][b"num_nodes"] = 2**62  # type: ignore[index]
    return {
        "creation-date-1e30": fastbencode.bencode(date),
        "kwargs-nested-30000": fastbencode.bencode(nested),
        "model-of-1GB": fastbencode.bencode(huge),
        "num-nodes-2**62": fastbencode.bencode(count),
    }


@pytest.fixture(scope="module")
def server() -> Iterator[HostileServer]:
    with HostileServer(hostile_torrents()) as running:
        yield running


# -- the cases ------------------------------------------------------------------------------------

SERVER_CASES = sorted(BEHAVIOURS)


@pytest.mark.network
@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", SERVER_CASES)
def test_show_url_from_a_hostile_server(case: str, server: HostileServer, tmp_path: Path) -> None:
    run = run_cli("show", f"{server.url}/{case}", "--timeout", str(DEADLINE_S), cwd=tmp_path)
    assert_one_line_error(run, f"show URL  {case}", within=DEADLINE_S + SLACK_S)


@pytest.mark.network
@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["https-to-plain-server", *SERVER_CASES])
def test_peer_url_from_a_hostile_server(case: str, server: HostileServer, tmp_path: Path) -> None:
    url = f"{server.url}/{case}"
    if case == "https-to-plain-server":
        url = url.replace("http://", "https://")
    out = tmp_path / "out"
    run = run_cli(
        "peer", url, "--out", str(out), "--download-timeout", str(DEADLINE_S), cwd=tmp_path
    )
    assert_one_line_error(run, f"peer URL  {case}", within=DEADLINE_S + SLACK_S)
    assert not any(p.name.startswith(".") for p in out.rglob("*")), "a temporary file was left"


@pytest.mark.network
@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(hostile_torrents()))
def test_hostile_torrents_through_show_and_peer(
    case: str, server: HostileServer, tmp_path: Path
) -> None:
    path = tmp_path / f"{case}.torrent"
    path.write_bytes(hostile_torrents()[case])
    for label, args in (
        ("show FILE", ["show", str(path)]),
        ("peer FILE", ["peer", str(path), "--out", str(tmp_path / "out")]),
        ("show URL ", ["show", f"{server.url}/{case}"]),
        ("peer URL ", ["peer", f"{server.url}/{case}", "--out", str(tmp_path / "joined")]),
    ):
        run = run_cli(*args, cwd=tmp_path)
        assert_one_line_error(run, f"{label} {case}", within=10.0)


@pytest.mark.network
@pytest.mark.timeout(60)
def test_show_escapes_control_characters_from_the_torrent(tmp_path: Path) -> None:
    evil = "\x1b[2J\x1b]0;pwned\x07\rfake line\u202eevil"
    meta = base_meta()
    meta[b"comment"] = evil.encode()
    meta[b"created by"] = b"\x1b[31mred"
    meta[b"info"][b"data"][b"dataset"] = b"digits\x1b[8m"  # type: ignore[index]
    meta[b"info"][b"model"][b"kwargs"] = b'{"note":"\\u001b[1m"}'  # type: ignore[index]
    meta[b"creation date"] = 1_700_000_000
    path = tmp_path / "escapes.torrent"
    path.write_bytes(fastbencode.bencode(meta))
    run = run_cli("show", str(path), cwd=tmp_path, limit=30)
    assert run.returncode == 0, run.stderr
    assert not any(c in run.stdout for c in "\x1b\x07\r\u202e")
    assert r"\x1b[2J\x1b]0;pwned\x07\rfake line\u202eevil" in run.stdout
    assert r"digits\x1b[8m" in run.stdout and r"\x1b[31mred" in run.stdout
    assert r"\x1b[1m" in run.stdout


# -- the dataset downloader -----------------------------------------------------------------------


@pytest.mark.network
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "case", ["endless-100-continue", "body-1-byte-per-s", "headers-never-end", "redirect-loop"]
)
def test_dataset_downloads_end_by_their_deadline(
    case: str, server: HostileServer, tmp_path: Path
) -> None:
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        download_file(
            [f"{server.url}/{case}"],
            tmp_path / "f.gz",
            sha256="0" * 64,
            progress=False,
            timeout=DEADLINE_S,
        )
    took = time.monotonic() - start
    ROWS.append(f"{'download_file ' + case:<48} DataError {took:5.2f} s  {str(info.value)[:80]}")
    print(ROWS[-1])
    assert took <= DEADLINE_S + SLACK_S
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


# -- announces to a hostile tracker ----------------------------------------------------------------


@pytest.mark.network
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "case", ["endless-100-continue", "body-1-byte-per-s", "headers-never-end", "bad-status-line"]
)
def test_announces_to_a_hostile_tracker_end_by_their_timeout(
    case: str, server: HostileServer
) -> None:
    from fedtorrent.errors import TrackerError
    from fedtorrent.net.tracker.client import TrackerClient

    client = TrackerClient(f"{server.url}/{case}/announce", timeout=DEADLINE_S, retries=0)
    start = time.monotonic()
    with pytest.raises(TrackerError) as info:
        client.announce("a" * 64, "peer-0", port=7000)
    took = time.monotonic() - start
    assert took <= DEADLINE_S + SLACK_S
    assert "\n" not in str(info.value)


# -- first mistakes with output paths -------------------------------------------------------------


@pytest.mark.network
@pytest.mark.timeout(120)
def test_create_makes_missing_folders_and_explains_impossible_ones(tmp_path: Path) -> None:
    made = run_cli("create", "-o", "missing/dir/s.torrent", "--dataset", "digits", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "missing/dir/s.torrent").is_file()
    assert (tmp_path / "missing/dir/s.state").is_file()
    assert not [p for p in (tmp_path / "missing/dir").iterdir() if p.name.startswith(".")]
    (tmp_path / "a_file").write_text("x")
    refused = run_cli("create", "-o", "a_file/sub/s.torrent", "--dataset", "digits", cwd=tmp_path)
    assert_one_line_error(refused, "create -o a_file/sub/s.torrent", within=60)
    assert "a_file" in refused.stderr
    peer = run_cli(
        "peer", "missing/dir/s.torrent", "--out", "a_file/out", "--node-index", "0", cwd=tmp_path
    )
    assert_one_line_error(peer, "peer --out a_file/out", within=60)
