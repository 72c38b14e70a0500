"""Several peers in one process, one thread each: how ``swarm --processes`` fits 100+ peers.

A peer process costs mostly what every process pays once (the interpreter, torch, the dataset's
pages); a hosted peer adds only its shard, its model and its sockets. Each hosted peer keeps all
that makes it a peer: its own ZeroMQ socket and identity, its own ``--out`` folder (status,
records, checkpoint, ledger, ``peer.log``); nothing is shared between hosted peers but the
process, the memory-mapped dataset and the split of it. The plan a launcher writes lists each
peer's ``fedtorrent peer`` arguments, which ``fedtorrent host`` parses with that command's own
parser.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Protocol

from fedtorrent.errors import ConfigError
from fedtorrent.metrics.records import write_json

log = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
_MAX_PLAN_BYTES = 16 << 20


def write_plan(path: Path, peers: Sequence[Sequence[str]]) -> None:
    """Write a host plan: the ``fedtorrent peer`` arguments of each peer it runs."""
    write_json(path, {"peers": [list(arguments) for arguments in peers]})


def read_plan(path: Path) -> list[list[str]]:
    """The peers' argument lists of a plan :func:`write_plan` wrote.

    Raises:
        ConfigError: the file is missing, too large, or not a list of string lists.
    """
    try:
        if path.stat().st_size > _MAX_PLAN_BYTES:
            raise ConfigError(f"host plan {path} is larger than {_MAX_PLAN_BYTES} bytes")
        document = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read host plan {path}: {exc}") from None
    peers = document.get("peers") if isinstance(document, dict) else None
    if (
        not isinstance(peers, list)
        or not peers
        or not all(isinstance(a, list) and all(isinstance(s, str) for s in a) for a in peers)
    ):
        raise ConfigError(f"host plan {path} must hold a non-empty list of argument lists")
    return peers


class _Config(Protocol):
    @property
    def out_dir(self) -> Path: ...


class Hosted(Protocol):
    """What the host needs of a peer (``node.peer.Peer`` is one)."""

    @property
    def config(self) -> _Config:
        """Its settings; ``out_dir`` names its thread and holds its ``peer.log``."""

    def start(self) -> None:
        """Load, bind, announce."""

    def run(self) -> str:
        """Run its rounds."""

    def request_stop(self) -> None:
        """Ask it to stop after the current phase (from a signal handler)."""

    def close(self) -> None:
        """Say goodbye and release everything."""


class _ThreadLog(logging.Filter):
    """Passes the records of one hosted peer: its thread and the threads it started."""

    def __init__(self, thread: str) -> None:
        super().__init__()
        self.thread = thread

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.threadName or ""
        return name == self.thread or name.startswith(self.thread + "/")


def host_peers(peers: Sequence[Hosted]) -> bool:
    """Start and run every peer on its own thread until all end; True when none failed.

    Each peer's thread is named after its ``--out`` folder, and threads a peer starts carry that
    name as a prefix (``net.transport.base.child_thread_name``), so its ``peer.log`` receives its
    records only; the host's own records go to stderr. SIGTERM and SIGINT stop every peer after
    its current phase.
    """
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    formatter = logging.Formatter(LOG_FORMAT)
    names = [peer.config.out_dir.name for peer in peers]
    if len(set(names)) != len(names):
        raise ConfigError("hosted peers need output folders of different names")
    console = logging.StreamHandler()
    mine = [_ThreadLog(name) for name in names]
    console.addFilter(lambda record: not any(f.filter(record) for f in mine))
    handlers: list[logging.Handler] = [console]
    for peer, name in zip(peers, names, strict=True):
        file = logging.FileHandler(peer.config.out_dir / "peer.log", encoding="utf-8")
        file.addFilter(_ThreadLog(name))
        handlers.append(file)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping %d peers after this phase", signum, len(peers))
        for peer in peers:
            peer.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failed: list[str] = []

    def run(peer: Hosted) -> None:
        try:
            peer.start()
            peer.run()
        except Exception as exc:  # the peer wrote it to its status; the others go on
            log.error("%s failed: %s", threading.current_thread().name, exc)
            failed.append(threading.current_thread().name)
        finally:
            peer.close()

    threads = [
        threading.Thread(target=run, args=(peer,), name=name)
        for peer, name in zip(peers, names, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.5)  # a bounded wait, so that the main thread still takes signals
    for handler in handlers:
        root.removeHandler(handler)
        handler.close()
    return not failed
