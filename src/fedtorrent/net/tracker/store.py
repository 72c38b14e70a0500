"""SQLite persistence for the swarm registry, so a restarted tracker remembers its swarms.

The registry writes behind: the server drains its changes every ``flush_interval`` seconds and this
store applies them in one transaction (WAL journal, ``synchronous=NORMAL``). A crash therefore
loses at most the last flush interval of announces; peers re-announce within one interval anyway.
The store is called from one thread at a time (the server's flush worker), never concurrently.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from fedtorrent.errors import FedTorrentError
from fedtorrent.net.tracker.registry import Changes

SCHEMA_VERSION = 2
"""2 adds ``keys`` (peer id -> Ed25519 key binding); a version-1 file is upgraded in place."""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS swarms (
    info_hash TEXT PRIMARY KEY,
    created REAL NOT NULL,
    downloaded INTEGER NOT NULL,
    tracker_bytes_in INTEGER NOT NULL,
    tracker_bytes_out INTEGER NOT NULL,
    announces INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS peers (
    info_hash TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    ip TEXT NOT NULL,
    port INTEGER NOT NULL,
    source TEXT NOT NULL,
    pubkey TEXT,
    round INTEGER NOT NULL,
    accuracy REAL,
    bytes_sent INTEGER NOT NULL,
    bytes_received INTEGER NOT NULL,
    completed INTEGER NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (info_hash, peer_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS keys (
    info_hash TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    pubkey TEXT NOT NULL,
    last_ts INTEGER NOT NULL,
    PRIMARY KEY (info_hash, peer_id)
) WITHOUT ROWID;
"""
_PEER_COLUMNS = (
    "info_hash, peer_id, ip, port, source, pubkey, round, accuracy, bytes_sent, bytes_received, "
    "completed, first_seen, last_seen"
)
_SWARM_COLUMNS = "info_hash, created, downloaded, tracker_bytes_in, tracker_bytes_out, announces"
_KEY_COLUMNS = "info_hash, peer_id, pubkey, last_ts"


class StoreError(FedTorrentError):
    """The tracker database cannot be opened or has an unknown schema."""


class SwarmStore:
    """One SQLite file in WAL mode; ``open()`` before use, ``close()`` after."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        """Open (creating if needed) the database and check its schema version.

        Raises:
            StoreError: the file is not a fedtorrent tracker database of this version.
        """
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, SCHEMA_VERSION):
                db.close()
                raise StoreError(
                    f"{self.path}: tracker database schema {version}, expected {SCHEMA_VERSION}"
                )
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open tracker database {self.path}: {exc}") from exc
        self._db = db

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> SwarmStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("tracker database is not open")
        return self._db

    def load(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """All swarm, peer and key rows, in the layout ``SwarmRegistry.restore`` takes."""
        db = self._conn()
        swarms = db.execute(f"SELECT {_SWARM_COLUMNS} FROM swarms").fetchall()
        peers = db.execute(f"SELECT {_PEER_COLUMNS} FROM peers").fetchall()
        keys = db.execute(f"SELECT {_KEY_COLUMNS} FROM keys").fetchall()
        return swarms, peers, keys

    def write(self, changes: Changes) -> None:
        """Apply one batch of registry changes in a single transaction."""
        if not changes:
            return
        db = self._conn()
        db.execute("BEGIN")
        try:
            db.executemany(
                f"INSERT OR REPLACE INTO swarms ({_SWARM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                changes.swarms,
            )
            db.executemany(
                f"INSERT OR REPLACE INTO peers ({_PEER_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                changes.peers,
            )
            db.executemany(
                "DELETE FROM peers WHERE info_hash = ? AND peer_id = ?", changes.gone_peers
            )
            db.executemany(
                f"INSERT OR REPLACE INTO keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?)", changes.keys
            )
            db.executemany(
                "DELETE FROM keys WHERE info_hash = ? AND peer_id = ?", changes.gone_keys
            )
            for table in ("peers", "keys"):
                db.executemany(
                    f"DELETE FROM {table} WHERE info_hash = ?", [(h,) for h in changes.gone_swarms]
                )
            db.executemany(
                "DELETE FROM swarms WHERE info_hash = ?", [(h,) for h in changes.gone_swarms]
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
