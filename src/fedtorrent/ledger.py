"""A per-peer, signed, hash-chained SQLite log of every update a peer sends or receives.

Each entry's hash covers its fields, the owner's key and the previous entry's hash; the owner signs
that hash. :func:`verify_ledgers` checks every chain, then cross-checks ledgers against each other:
a received update must appear as sent by its sender, and no sender may share two different states
in one round (equivocation).

What it proves: an edit by anyone but the owner breaks a hash or a signature. The owner holds its
key and could rewrite its own ledger consistently, so its claims are trusted only where other
ledgers agree; a received entry that stores the sender's update signature is proof the sender
really shared that digest. Dropping the newest entries leaves a valid chain: only the peers'
cross-check (``undelivered``, ``missing``) can reveal it.
"""

from __future__ import annotations

import hashlib
import math
import re
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import nacl.exceptions
import nacl.signing

from fedtorrent.errors import ConfigError, LedgerError, MessageError, SignatureError
from fedtorrent.net.identity import PeerIdentity, public_keys_from, verify_update

LEDGER_SUFFIX = ".ledger.sqlite"
"""File name ending :func:`verify_ledgers` looks for inside run folders."""
GENESIS_HASH = "0" * 64
"""``prev_hash`` of the first entry."""
DIRECTIONS = ("sent", "received")
SCHEMA_VERSION = "1"
_DOMAIN = "fedtorrent/ledger/v1"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_COLUMNS = (
    "seq, round, direction, sender, receiver, payload_sha256, num_bytes, weight, nonce, "
    "update_signature, prev_hash, entry_hash, signature"
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    round INTEGER NOT NULL,
    direction TEXT NOT NULL,
    sender TEXT NOT NULL,
    receiver TEXT,
    payload_sha256 TEXT NOT NULL,
    num_bytes INTEGER NOT NULL,
    weight REAL,
    nonce BLOB,
    update_signature BLOB,
    prev_hash TEXT NOT NULL,
    entry_hash TEXT NOT NULL,
    signature BLOB NOT NULL
);
"""


@dataclass(frozen=True)
class LedgerEntry:
    """One logged update, as stored.

    ``receiver`` None: sent to the whole cohort. ``weight``: the mixing weight the owner gave a
    received update (None when not mixed or not known).
    """

    seq: int
    round: int
    direction: str
    sender: str
    receiver: str | None
    payload_sha256: str
    num_bytes: int
    weight: float | None
    nonce: bytes | None
    update_signature: bytes | None
    prev_hash: str
    entry_hash: str
    signature: bytes


@dataclass(frozen=True)
class _Meta:
    owner: str
    public_key: str
    info_hash: str | None


def ledger_path(run_dir: Path, owner: str) -> Path:
    """Where a peer's ledger lives in a run folder (characters unsafe in file names become _)."""
    return Path(run_dir) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', owner)}{LEDGER_SUFFIX}"


class Ledger:
    """One peer's append-only log. Build it, then ``open()`` (or ``with``), append, ``close()``.

    ``owner`` names the peer in entries (default: its public key in hex). ``info_hash`` names the
    session, so receivers' stored update signatures can be checked later. Use from one thread
    at a time.
    """

    def __init__(
        self,
        path: Path,
        identity: PeerIdentity,
        *,
        owner: str | None = None,
        info_hash: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.identity = identity
        self.owner = identity.public_key_hex if owner is None else owner
        self.info_hash = info_hash
        self._db: sqlite3.Connection | None = None

    def open(self) -> Ledger:
        """Create or reopen the file; an existing ledger must belong to the same owner and key.

        Raises:
            LedgerError: the file belongs to another owner, key or session, or is not a ledger.
        """
        if self._db is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One thread at a time, but not always the same one (a peer starts, runs and closes
        # from whichever threads its owner uses), so sqlite3's same-thread check is off.
        db = sqlite3.connect(self.path, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # durable across a crash of this process
            with db:
                db.executescript(_SCHEMA)
                self._claim(db)
        except sqlite3.DatabaseError as exc:
            db.close()
            raise LedgerError(f"{self.path} is not a usable ledger: {exc}") from exc
        except LedgerError:
            db.close()
            raise
        self._db = db
        return self

    def close(self) -> None:
        """Close the file; safe to call twice."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> Ledger:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record_sent(
        self,
        *,
        round: int,
        receiver: str | None,
        payload_sha256: str,
        num_bytes: int,
        nonce: bytes | None = None,
        update_signature: bytes | None = None,
    ) -> LedgerEntry:
        """Log an update this peer sent (``receiver`` None: the same update to everyone)."""
        return self.append(
            round=round,
            direction="sent",
            sender=self.owner,
            receiver=receiver,
            payload_sha256=payload_sha256,
            num_bytes=num_bytes,
            nonce=nonce,
            update_signature=update_signature,
        )

    def record_received(
        self,
        *,
        round: int,
        sender: str,
        payload_sha256: str,
        num_bytes: int,
        weight: float | None = None,
        nonce: bytes | None = None,
        update_signature: bytes | None = None,
    ) -> LedgerEntry:
        """Log an update this peer received; keep the sender's nonce and signature as proof.

        Log it after mixing when the mixing ``weight`` should be on record: entries never change.
        """
        return self.append(
            round=round,
            direction="received",
            sender=sender,
            receiver=self.owner,
            payload_sha256=payload_sha256,
            num_bytes=num_bytes,
            weight=weight,
            nonce=nonce,
            update_signature=update_signature,
        )

    def append(
        self,
        *,
        round: int,
        direction: str,
        sender: str,
        receiver: str | None,
        payload_sha256: str,
        num_bytes: int,
        weight: float | None = None,
        nonce: bytes | None = None,
        update_signature: bytes | None = None,
    ) -> LedgerEntry:
        """Chain, sign and store one entry in its own transaction; returns it.

        Raises:
            ConfigError: a field out of range, or an entry this peer is not a party to.
            LedgerError: the ledger is not open.
        """
        if self._db is None:
            raise LedgerError(f"ledger {self.path} is not open")
        fields = _EntryFields(
            round=round,
            direction=direction,
            sender=sender,
            receiver=receiver,
            payload_sha256=payload_sha256,
            num_bytes=num_bytes,
            weight=weight,
            nonce=nonce,
            update_signature=update_signature,
        )
        problem = fields.problem(self.owner)
        if problem:
            raise ConfigError(f"cannot log this entry: {problem}")
        meta = _Meta(self.owner, self.identity.public_key_hex, self.info_hash)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")  # read the tail and write in one transaction
            last = self._db.execute(
                "SELECT seq, entry_hash FROM entries ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            seq, prev_hash = (1, GENESIS_HASH) if last is None else (last[0] + 1, last[1])
            entry_hash = _entry_hash(meta, seq, prev_hash, fields)
            signature = self.identity.sign(bytes.fromhex(entry_hash))
            entry = LedgerEntry(
                seq=seq,
                **fields.as_dict(),
                prev_hash=prev_hash,
                entry_hash=entry_hash,
                signature=signature,
            )
            self._db.execute(
                f"INSERT INTO entries ({_COLUMNS}) VALUES ({', '.join('?' * 13)})",
                _row(entry),
            )
        return entry

    def entries(self) -> list[LedgerEntry]:
        """Every entry, oldest first (as stored; :func:`verify_ledgers` checks them)."""
        if self._db is None:
            raise LedgerError(f"ledger {self.path} is not open")
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM entries ORDER BY seq").fetchall()
        return [LedgerEntry(*row) for row in rows]

    def _claim(self, db: sqlite3.Connection) -> None:
        """Write the owner's meta on a new file; on an existing one it must match exactly.

        The meta is part of every entry hash, so it can never change once written.
        """
        wanted = {
            "version": SCHEMA_VERSION,
            "owner": self.owner,
            "public_key": self.identity.public_key_hex,
        }
        if self.info_hash is not None:
            wanted["info_hash"] = self.info_hash
        stored = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if not stored:
            db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", sorted(wanted.items()))
            return
        for key, value in wanted.items():
            if stored.get(key) != value:
                raise LedgerError(f"{self.path} has {key} {stored.get(key)!r}, not {value!r}")
        self.info_hash = stored.get("info_hash")


@dataclass(frozen=True)
class _EntryFields:
    """The caller-given fields of an entry, validated in one place for writing and verifying."""

    round: int
    direction: str
    sender: str
    receiver: str | None
    payload_sha256: str
    num_bytes: int
    weight: float | None
    nonce: bytes | None
    update_signature: bytes | None

    def problem(self, owner: str) -> str:
        """Why these fields cannot be in ``owner``'s ledger; empty when they can."""
        if not (_is_int(self.round) and self.round >= 0):
            return f"round must be an int >= 0, got {self.round!r}"
        if self.direction not in DIRECTIONS:
            return f"direction must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}"
        if not (isinstance(self.sender, str) and self.sender):
            return "sender must be a non-empty string"
        if not (self.receiver is None or (isinstance(self.receiver, str) and self.receiver)):
            return "receiver must be a non-empty string or None"
        if self.direction == "sent" and self.sender != owner:
            return f"a sent entry's sender must be the owner {owner!r}, got {self.sender!r}"
        if self.direction == "received" and self.receiver != owner:
            return f"a received entry's receiver must be the owner {owner!r}"
        if not (isinstance(self.payload_sha256, str) and _HEX64.fullmatch(self.payload_sha256)):
            return "payload_sha256 must be 64 lowercase hex characters"
        if not (_is_int(self.num_bytes) and self.num_bytes >= 0):
            return f"num_bytes must be an int >= 0, got {self.num_bytes!r}"
        if self.weight is not None and not (
            isinstance(self.weight, float) and math.isfinite(self.weight)
        ):
            return f"weight must be a finite float or None, got {self.weight!r}"
        for name in ("nonce", "update_signature"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, bytes) and 0 < len(value) <= 128):
                return f"{name} must be 1 to 128 bytes or None"
        return ""

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry_hash(meta: _Meta, seq: int, prev_hash: str, fields: _EntryFields) -> str:
    """sha256 of the canonical msgpack of the entry, its position and its owner."""
    canonical = msgpack.packb(
        [
            _DOMAIN,
            meta.owner,
            meta.public_key,
            meta.info_hash,
            seq,
            prev_hash,
            fields.round,
            fields.direction,
            fields.sender,
            fields.receiver,
            fields.payload_sha256,
            fields.num_bytes,
            fields.weight,
            fields.nonce,
            fields.update_signature,
        ],
        use_bin_type=True,
    )
    return hashlib.sha256(canonical).hexdigest()


def _row(entry: LedgerEntry) -> tuple[Any, ...]:
    return tuple(getattr(entry, name) for name in entry.__dataclass_fields__)


# ---------------------------------------------------------------------------------------------
# Verification

PROBLEM_KINDS = ("unreadable", "tampered", "unknown_key", "forged", "missing", "equivocation")
"""Findings that fail verification."""
WARNING_KINDS = ("undelivered", "unchecked")
"""Findings that may be innocent: a send lost in transit, a sender whose ledger is absent."""


@dataclass(frozen=True)
class Finding:
    """One thing :func:`verify_ledgers` found; ``seq``/``round`` are None when not about one."""

    kind: str
    ledger: str
    owner: str
    seq: int | None
    round: int | None
    detail: str


@dataclass(frozen=True)
class LedgerSummary:
    """One ledger file as verified: ``chain_ok`` when every hash, link and signature holds."""

    path: str
    owner: str
    entries: int
    chain_ok: bool


@dataclass(frozen=True)
class LedgerReport:
    """Everything :func:`verify_ledgers` found; ``ok`` when no problem (warnings allowed)."""

    ledgers: tuple[LedgerSummary, ...]
    problems: tuple[Finding, ...]
    warnings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        """Whether no problem was found."""
        return not self.problems


@dataclass
class _Loaded:
    path: str
    meta: _Meta | None
    entries: list[LedgerEntry] = field(default_factory=list)
    key: bytes | None = None
    """The owner's key signatures are checked against (known, else self-declared)."""


def find_ledgers(sources: Iterable[Path]) -> list[Path]:
    """Ledger files in ``sources``: files as given, folders searched for ``*.ledger.sqlite``.

    Raises:
        LedgerError: a source does not exist, or no ledger is found at all.
    """
    found: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found.extend(sorted(source.rglob(f"*{LEDGER_SUFFIX}")))
        elif source.is_file():
            found.append(source)
        else:
            raise LedgerError(f"{source} does not exist")
    unique = list(dict.fromkeys(path.resolve() for path in found))
    if not unique:
        raise LedgerError("no ledger files (*.ledger.sqlite) found")
    return unique


def verify_ledgers(
    sources: Iterable[Path],
    known_keys: Mapping[str, str | bytes] | None = None,
) -> LedgerReport:
    """Check every ledger's chain, then cross-check them all against each other.

    ``sources`` are run folders or ledger files. ``known_keys`` maps owners to Ed25519 public keys
    (hex or raw); without it each ledger's self-declared key is used, which proves integrity
    against third parties but not who wrote the ledger.

    Raises:
        LedgerError: no ledger found, or a source that does not exist.
        ConfigError: a malformed key in ``known_keys``.
    """
    keys = public_keys_from(known_keys or {})
    problems: list[Finding] = []
    warnings: list[Finding] = []
    loaded = [_load(path) for path in find_ledgers(sources)]
    summaries: list[LedgerSummary] = []
    by_owner: dict[str, _Loaded] = {}
    for ledger in loaded:
        found = _check_chain(ledger, keys, known_keys is not None)
        problems.extend(found)
        owner = ledger.meta.owner if ledger.meta else "?"
        summaries.append(LedgerSummary(ledger.path, owner, len(ledger.entries), not found))
        if ledger.meta is None:
            continue
        if owner in by_owner:
            problems.append(
                Finding("tampered", ledger.path, owner, None, None, "a second ledger for owner")
            )
            continue
        by_owner[owner] = ledger
    cross_problems, cross_warnings = _cross_check(by_owner, keys)
    problems.extend(cross_problems)
    warnings.extend(cross_warnings)
    return LedgerReport(tuple(summaries), tuple(problems), tuple(warnings))


def _load(path: Path) -> _Loaded:
    """Read a ledger read-only; a file that cannot be read yields a ledger with no meta."""
    try:
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return _Loaded(str(path), None)
    try:
        meta_rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
        rows = db.execute(f"SELECT {_COLUMNS} FROM entries ORDER BY seq").fetchall()
    except sqlite3.Error:
        return _Loaded(str(path), None)
    finally:
        db.close()
    owner, public_key = meta_rows.get("owner"), meta_rows.get("public_key")
    if not (isinstance(owner, str) and isinstance(public_key, str)):
        return _Loaded(str(path), None)
    info_hash = meta_rows.get("info_hash")
    meta = _Meta(owner, public_key, info_hash if isinstance(info_hash, str) else None)
    return _Loaded(str(path), meta, [LedgerEntry(*row) for row in rows])


def _check_chain(ledger: _Loaded, keys: Mapping[str, bytes], keys_given: bool) -> list[Finding]:
    """Hash links, entry hashes, owner signatures and field sanity of one ledger."""
    if ledger.meta is None:
        return [Finding("unreadable", ledger.path, "?", None, None, "not a readable ledger")]
    meta = ledger.meta
    found: list[Finding] = []

    def flag(kind: str, entry: LedgerEntry | None, detail: str) -> None:
        seq = entry.seq if entry and _is_int(entry.seq) else None
        rnd = entry.round if entry and _is_int(entry.round) else None
        found.append(Finding(kind, ledger.path, meta.owner, seq, rnd, detail))

    declared: bytes | None = None
    try:
        declared = public_keys_from({meta.owner: meta.public_key})[meta.owner]
    except ConfigError:
        flag("tampered", None, "the ledger's declared public key is malformed")
    known = keys.get(meta.owner)
    if keys_given and known is None:
        flag("unknown_key", None, f"owner {meta.owner!r} is not among the known keys")
    elif known is not None and known != declared:
        flag("unknown_key", None, "the ledger's declared key differs from the known key")
    ledger.key = known if known is not None else declared

    prev_hash = GENESIS_HASH
    for expected_seq, entry in enumerate(ledger.entries, start=1):
        fields = _EntryFields(**{k: getattr(entry, k) for k in _EntryFields.__dataclass_fields__})
        problem = fields.problem(meta.owner)
        if problem:
            flag("tampered", entry, problem)
        elif entry.seq != expected_seq:
            flag("tampered", entry, f"seq {entry.seq} where {expected_seq} was due (entries gone)")
        elif entry.prev_hash != prev_hash:
            flag("tampered", entry, "prev_hash does not link to the previous entry")
        elif entry.entry_hash != _entry_hash(meta, entry.seq, entry.prev_hash, fields):
            flag("tampered", entry, "entry hash does not match its contents (edited)")
        elif not _signed(ledger.key, entry):
            flag("tampered", entry, "owner's signature does not verify")
        prev_hash = entry.entry_hash
    return found


def _signed(key: bytes | None, entry: LedgerEntry) -> bool:
    if key is None or not isinstance(entry.signature, bytes):
        return False
    try:
        nacl.signing.VerifyKey(key).verify(bytes.fromhex(entry.entry_hash), entry.signature)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        return False
    return True


def _cross_check(
    by_owner: Mapping[str, _Loaded], keys: Mapping[str, bytes]
) -> tuple[list[Finding], list[Finding]]:
    """Received vs sent across ledgers, update signatures, and equivocation."""
    problems: list[Finding] = []
    warnings: list[Finding] = []
    # (sender, round) -> digest -> who vouches for it (the sender's own log, or receivers)
    shared: dict[tuple[str, int], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    sent: dict[tuple[str, int], list[LedgerEntry]] = defaultdict(list)
    received: dict[tuple[str, int], list[LedgerEntry]] = defaultdict(list)
    for owner, ledger in by_owner.items():
        for entry in ledger.entries:
            if not (_is_int(entry.round) and isinstance(entry.payload_sha256, str)):
                continue  # already reported as tampered
            if entry.direction == "sent" and entry.sender == owner:
                sent[(owner, entry.round)].append(entry)
                shared[(owner, entry.round)][entry.payload_sha256].append(f"{owner} (own log)")
            elif entry.direction == "received" and isinstance(entry.sender, str):
                received[(entry.sender, entry.round)].append(entry)

    for (sender, rnd), entries in sorted(received.items()):
        sender_ledger = by_owner.get(sender)
        sender_key = keys.get(sender) or (sender_ledger.key if sender_ledger else None)
        for entry in entries:
            receiver = str(entry.receiver)
            path = by_owner[receiver].path if receiver in by_owner else ""
            proof = _update_proof(entry, sender_key, by_owner.get(receiver))
            if proof == "forged":
                problems.append(
                    Finding(
                        "forged",
                        path,
                        receiver,
                        entry.seq,
                        rnd,
                        f"update said to be from {sender!r} carries a signature that fails",
                    )
                )
                continue
            label = f"{receiver} ({'signed' if proof == 'signed' else 'unsigned claim'})"
            shared[(sender, rnd)][entry.payload_sha256].append(label)
            if sender_ledger is None:
                warnings.append(
                    Finding(
                        "unchecked",
                        path,
                        receiver,
                        entry.seq,
                        rnd,
                        f"no ledger from sender {sender!r} to cross-check",
                    )
                )
                continue
            if not any(
                s.payload_sha256 == entry.payload_sha256 and s.receiver in (receiver, None)
                for s in sent.get((sender, rnd), [])
            ):
                problems.append(
                    Finding(
                        "missing",
                        path,
                        receiver,
                        entry.seq,
                        rnd,
                        f"received {entry.payload_sha256[:12]} from {sender!r}, "
                        "which its ledger does not show as sent",
                    )
                )

    for (sender, rnd), entries in sorted(sent.items()):
        for entry in entries:
            if entry.receiver is None or entry.receiver not in by_owner:
                continue
            if not any(
                r.payload_sha256 == entry.payload_sha256 and r.receiver == entry.receiver
                for r in received.get((sender, rnd), [])
            ):
                warnings.append(
                    Finding(
                        "undelivered",
                        by_owner[sender].path,
                        sender,
                        entry.seq,
                        rnd,
                        f"sent {entry.payload_sha256[:12]} to {entry.receiver!r}, "
                        "whose ledger does not show it received",
                    )
                )

    for (sender, rnd), digests in sorted(shared.items()):
        if len(digests) > 1:
            seen = "; ".join(
                f"{digest[:12]} by {', '.join(sorted(set(who)))}"
                for digest, who in sorted(digests.items())
            )
            path = by_owner[sender].path if sender in by_owner else ""
            problems.append(
                Finding(
                    "equivocation",
                    path,
                    sender,
                    None,
                    rnd,
                    f"{len(digests)} different states in one round: {seen}",
                )
            )
    return problems, warnings


def _update_proof(entry: LedgerEntry, sender_key: bytes | None, receiver: _Loaded | None) -> str:
    """``signed``, ``forged`` or ``unsigned`` (no signature, or nothing to check it with)."""
    info_hash = receiver.meta.info_hash if receiver and receiver.meta else None
    if entry.update_signature is None or sender_key is None or info_hash is None:
        return "unsigned"
    if not isinstance(entry.nonce, bytes):
        return "forged"
    try:
        verify_update(
            sender_key,
            entry.update_signature,
            info_hash=info_hash,
            round=entry.round,
            sender=entry.sender,
            receiver=entry.receiver,
            payload_sha256=entry.payload_sha256,
            nonce=entry.nonce,
        )
    except (SignatureError, MessageError):
        # The sender may have signed for the whole cohort (receiver None).
        try:
            verify_update(
                sender_key,
                entry.update_signature,
                info_hash=info_hash,
                round=entry.round,
                sender=entry.sender,
                receiver=None,
                payload_sha256=entry.payload_sha256,
                nonce=entry.nonce,
            )
        except (SignatureError, MessageError):
            return "forged"
    return "signed"
