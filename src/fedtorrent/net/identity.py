"""A peer's long-lived identity: one Ed25519 key that signs updates and keys its CurveZMQ links.

The CurveZMQ (X25519) key pair is derived from the Ed25519 seed (libsodium's conversion), so a
peer is named by one 32-byte public key: an allow-list or the tracker lists Ed25519 keys, and the
transport derives each one's CurveZMQ public key with :func:`curve_public_key`. Nobody can pair
their own link key with someone else's signing key.

Only the seed is stored, in ``<key_dir>/ed25519.key`` (hex, mode 0600, folder 0700); the public
halves are written beside it for people to copy into allow-lists.

Signed updates cover a canonical byte string of every field a receiver acts on (see
:func:`update_message`). Check the signature first, then the :class:`ReplayGuard`, so unsigned
traffic can never fill the guard's memory; :class:`UpdateVerifier` does both for a peer.
The same key signs the tracker announces that change a peer's listing (:func:`announce_message`).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import nacl.exceptions
import nacl.signing
from zmq.utils import z85

from fedtorrent.errors import ConfigError, MessageError, ReplayError, SignatureError

if TYPE_CHECKING:
    from fedtorrent.net.wire import Header

SEED_FILE = "ed25519.key"
PUBLIC_FILE = "ed25519.pub"
CURVE_PUBLIC_FILE = "curve.pub"
NONCE_BYTES = 16
"""Length of :func:`new_nonce`; signed nonces may be 8 to 64 bytes (the wire's limit)."""
SIGNATURE_BYTES = 64
_DOMAIN = "fedtorrent/update/v1"
"""Prefix of every signed message, so a signature can never be replayed as another kind."""
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_NAME = 256


@dataclass(frozen=True)
class PeerIdentity:
    """A peer's signing key and everything derived from it."""

    signing_key: Any = field(repr=False)
    """A ``nacl.signing.SigningKey``."""

    @classmethod
    def generate(cls) -> PeerIdentity:
        """A fresh identity held in memory only (simulations and tests)."""
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> PeerIdentity:
        """The identity of a 32-byte seed; the same seed always gives the same keys."""
        if len(seed) != 32:
            raise ConfigError(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
        return cls(nacl.signing.SigningKey(seed))

    @property
    def public_key(self) -> bytes:
        """The 32-byte Ed25519 verify key that names this peer."""
        return bytes(self.signing_key.verify_key)

    @property
    def public_key_hex(self) -> str:
        """:attr:`public_key` as 64 lowercase hex characters."""
        return self.public_key.hex()

    @property
    def curve_secret(self) -> bytes:
        """The CurveZMQ secret key, Z85-encoded (40 bytes) as ``zmq`` socket options take it."""
        return bytes(z85.encode(bytes(self.signing_key.to_curve25519_private_key())))

    @property
    def curve_public(self) -> bytes:
        """The CurveZMQ public key, Z85-encoded (40 bytes)."""
        return curve_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """A detached 64-byte Ed25519 signature of ``message``."""
        return bytes(self.signing_key.sign(message).signature)


def load_or_create_identity(key_dir: Path) -> PeerIdentity:
    """Load the identity stored in ``key_dir``, creating the folder and key on first use.

    Creation is atomic (a second process racing to create loads the winner's key), and the key
    file is never readable by group or others.

    Raises:
        ConfigError: the key file is malformed or its permissions are looser than 0600.
    """
    key_dir = Path(key_dir)
    if not key_dir.exists():
        key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_dir.chmod(0o700)  # mkdir's mode is filtered by the umask
    seed_path = key_dir / SEED_FILE
    if not seed_path.exists():
        _create_seed_file(seed_path)
    identity = PeerIdentity.from_seed(_read_seed(seed_path))
    for name, text in (
        (PUBLIC_FILE, identity.public_key_hex),
        (CURVE_PUBLIC_FILE, identity.curve_public.decode("ascii")),
    ):
        public_path = key_dir / name
        # A process racing with us may write it first; it holds the same key.
        with contextlib.suppress(FileExistsError):
            _write_private(public_path, (text + "\n").encode("ascii"))
    return identity


def curve_public_key(public_key: bytes | str) -> bytes:
    """The Z85 CurveZMQ public key of a peer named by its Ed25519 public key (raw or hex).

    Raises:
        ConfigError: not a valid Ed25519 public key.
    """
    verify_key = _verify_key(public_key, error=ConfigError)
    return bytes(z85.encode(bytes(verify_key.to_curve25519_public_key())))


def new_nonce() -> bytes:
    """A fresh random nonce for one signed update."""
    return secrets.token_bytes(NONCE_BYTES)


def update_message(
    *,
    info_hash: str,
    round: int,
    sender: str,
    receiver: str | None,
    payload_sha256: str,
    nonce: bytes,
) -> bytes:
    """The canonical bytes a signature covers (msgpack of a fixed, domain-tagged list).

    ``receiver`` None means the update is meant for anyone in the swarm this round.

    Raises:
        MessageError: a field of the wrong type or size.
    """
    _check_text("info_hash", info_hash)
    _check_text("sender", sender)
    if receiver is not None:
        _check_text("receiver", receiver)
    if not (isinstance(round, int) and not isinstance(round, bool) and 0 <= round < 2**63):
        raise MessageError(f"round must be an int in [0, 2**63), got {round!r}")
    if not (isinstance(payload_sha256, str) and _HEX64.fullmatch(payload_sha256)):
        raise MessageError("payload_sha256 must be 64 lowercase hex characters")
    if not (isinstance(nonce, bytes) and 8 <= len(nonce) <= 64):
        raise MessageError("nonce must be 8 to 64 bytes")
    fields = [_DOMAIN, info_hash, round, sender, receiver, payload_sha256, nonce]
    return bytes(msgpack.packb(fields, use_bin_type=True))


def sign_update(
    signing_key: Any,
    *,
    info_hash: str,
    round: int,
    sender: str,
    receiver: str | None,
    payload_sha256: str,
    nonce: bytes,
) -> bytes:
    """Sign one update with a ``nacl.signing.SigningKey`` (or a :class:`PeerIdentity`).

    Returns the 64-byte detached signature.
    """
    message = update_message(
        info_hash=info_hash,
        round=round,
        sender=sender,
        receiver=receiver,
        payload_sha256=payload_sha256,
        nonce=nonce,
    )
    if isinstance(signing_key, PeerIdentity):
        return signing_key.sign(message)
    return bytes(signing_key.sign(message).signature)


def verify_update(
    public_key: bytes | str,
    signature: bytes,
    *,
    info_hash: str,
    round: int,
    sender: str,
    receiver: str | None,
    payload_sha256: str,
    nonce: bytes,
) -> None:
    """Check that ``signature`` is the sender's over exactly these fields.

    ``public_key`` is the sender's Ed25519 key (raw 32 bytes or hex), as the receiver knows it
    from the tracker or the torrent's allow-list, never as the message claims it.

    Raises:
        SignatureError: a bad key, a malformed signature, or one that does not verify.
        MessageError: a malformed field.
    """
    message = update_message(
        info_hash=info_hash,
        round=round,
        sender=sender,
        receiver=receiver,
        payload_sha256=payload_sha256,
        nonce=nonce,
    )
    verify_key = _verify_key(public_key, error=SignatureError)
    if not (isinstance(signature, bytes) and len(signature) == SIGNATURE_BYTES):
        raise SignatureError(f"a signature is {SIGNATURE_BYTES} bytes")
    try:
        verify_key.verify(message, signature)
    except nacl.exceptions.BadSignatureError as exc:
        raise SignatureError(f"update from {sender!r} for round {round} does not verify") from exc


ANNOUNCE_DOMAIN = "fedtorrent/announce/v1"
"""First line of every signed tracker announce (see :func:`announce_message`)."""


def announce_message(
    *, info_hash: str, peer_id: str, event: str, ip: str, port: int, pubkey: str, ts: int
) -> bytes:
    """The canonical bytes a tracker announce signature covers (docs/protocol.md, 2.6).

    The lines ``fedtorrent/announce/v1``, info-hash (lowercase hex), peer id, event (``""``,
    ``started``, ``stopped`` or ``completed``), the ``ip`` parameter in canonical form (``""`` when
    not sent), port, pubkey (lowercase hex, ``""`` when not sent) and ``ts`` (microseconds since
    the Unix epoch), joined by newlines and UTF-8 encoded.

    Raises:
        MessageError: a field holds a newline.
    """
    fields = (ANNOUNCE_DOMAIN, info_hash, peer_id, event, ip, str(port), pubkey, str(ts))
    if any("\n" in text for text in fields):
        raise MessageError("announce fields must not hold newlines")
    return "\n".join(fields).encode()


def verify_announce(public_key: bytes | str, signature: bytes, message: bytes) -> None:
    """Check an announce signature (``message`` from :func:`announce_message`).

    Raises:
        SignatureError: a bad key, a malformed signature, or one that does not verify.
    """
    verify_key = _verify_key(public_key, error=SignatureError)
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"a signature is {SIGNATURE_BYTES} bytes")
    try:
        verify_key.verify(message, signature)
    except nacl.exceptions.BadSignatureError as exc:
        raise SignatureError("announce signature does not verify") from exc


HELLO_DOMAIN = "fedtorrent/hello/v1"
"""First field of every signed hello (see :func:`hello_message`)."""


def hello_message(*, info_hash: str, peer_id: str, pubkey: bytes, port: int) -> bytes:
    """The canonical bytes a hello signature covers: msgpack of a fixed, domain-tagged list.

    ``[HELLO_DOMAIN, info_hash, peer_id, pubkey (32 raw bytes), port]``: this key speaks for this
    peer id in this session, and serves its state on ``port``.
    """
    return bytes(msgpack.packb([HELLO_DOMAIN, info_hash, peer_id, pubkey, port], use_bin_type=True))


def signed_hello(identity: PeerIdentity, *, info_hash: str, peer_id: str, port: int) -> list[bytes]:
    """``[header]`` of this peer's hello for one session, signed once (it never changes)."""
    from fedtorrent.net import wire  # noqa: PLC0415 (torch: the tracker imports this module)

    pubkey = identity.public_key
    message = hello_message(info_hash=info_hash, peer_id=peer_id, pubkey=pubkey, port=port)
    return wire.encode_hello(
        info_hash=info_hash, sender=peer_id, pubkey=pubkey, port=port, sig=identity.sign(message)
    )


def verify_hello(header: Header) -> str:
    """Check a decoded ``hello`` header's signature by the key it carries; return that key (hex).

    A good signature shows that whoever holds the key vouches for the peer id, session and port;
    not that the key is the one the peer id should have (first contact trusts it: docs/wire.md).

    Raises:
        SignatureError: reason ``bad_signature``.
    """
    pubkey, sig = header.pubkey or b"", header.sig or b""
    message = hello_message(
        info_hash=header.info_hash, peer_id=header.sender, pubkey=pubkey, port=header.port
    )
    try:
        verify_key = _verify_key(pubkey, error=SignatureError)
        if len(sig) != SIGNATURE_BYTES:
            raise SignatureError(f"a signature is {SIGNATURE_BYTES} bytes")
        verify_key.verify(message, sig)
    except (SignatureError, nacl.exceptions.BadSignatureError) as exc:
        raise SignatureError(
            f"bad_signature: hello from {header.sender!r} does not verify ({exc})",
            reason="bad_signature",
        ) from None
    return pubkey.hex()


class ReplayGuard:
    """Rejects, per sender, updates from an old round and nonces seen before.

    A sender's update for round ``r`` is accepted while ``r >= newest - window``, where
    ``newest`` is the latest round accepted from that sender, and only if its nonce is new.
    Nonces are remembered for the rounds still inside the window (older ones are refused anyway),
    at most ``max_per_round`` per sender and round, so memory stays bounded.
    """

    def __init__(self, *, window: int = 1, max_per_round: int = 1024) -> None:
        if window < 0 or max_per_round < 1:
            raise ConfigError(
                f"window must be >= 0 and max_per_round >= 1: {window}, {max_per_round}"
            )
        self.window = window
        self.max_per_round = max_per_round
        self.rejected = 0
        """Updates refused so far (for the run's security metrics)."""
        self._newest: dict[str, int] = {}
        self._nonces: dict[str, dict[int, set[bytes]]] = {}

    def newest_round(self, sender: str) -> int | None:
        """The latest round accepted from ``sender``; None before the first."""
        return self._newest.get(sender)

    def admit(self, sender: str, *, round: int, nonce: bytes) -> None:
        """Accept and remember one verified update, or raise.

        Raises:
            ReplayError: an old round, a nonce already used, or too many updates in one round.
        """
        newest = self._newest.get(sender)
        if newest is not None and round < newest - self.window:
            self.rejected += 1
            raise ReplayError(f"update from {sender!r} is for round {round}; newest is {newest}")
        by_round = self._nonces.setdefault(sender, {})
        if any(nonce in seen for seen in by_round.values()):
            self.rejected += 1
            raise ReplayError(f"update from {sender!r} reuses a nonce")
        seen = by_round.setdefault(round, set())
        if len(seen) >= self.max_per_round:
            self.rejected += 1
            raise ReplayError(
                f"more than {self.max_per_round} updates from {sender!r} in round {round}"
            )
        seen.add(nonce)
        if newest is None or round > newest:
            self._newest[sender] = newest = round
            for old in [r for r in by_round if r < newest - self.window]:
                del by_round[old]


class UpdateVerifier:
    """The receiving side of signed updates in a swarm: signature, then freshness.

    A state header must carry ``sig`` and ``nonce``; its signature (``receiver`` None: one
    signature per round for the whole cohort) must verify with the Ed25519 key its sender
    announced, and the header's ``pubkey``, when present, must be that key. Then the
    :class:`ReplayGuard` admits it, except that an update already admitted from a sender (same
    round, nonce and digest) may come again while its round is inside the guard's window: a
    neighbour still behind keeps serving its newest state, and one that is ahead serves the
    state it published earlier to a requester of that round (a pull protocol asks again).
    Rounds past ``last_round`` are refused as well: no honest peer of the session gets there.
    Thread-safe.

    Every refusal is a ``MessageError`` whose ``reason`` is ``unsigned``, ``bad_signature`` or
    ``replay`` (wire ``REASONS``).
    """

    def __init__(self, *, info_hash: str, last_round: int, window: int = 1) -> None:
        self.info_hash = info_hash
        self.last_round = last_round
        self.guard = ReplayGuard(window=window)
        self._admitted: dict[str, dict[int, tuple[bytes, str]]] = {}
        """Sender -> round -> (nonce, digest) admitted, for the rounds inside the window."""
        self._lock = threading.Lock()

    def verify(self, header: Header, public_key: str | bytes | None) -> None:
        """Accept one state header from ``header.sender``, whose announced key is ``public_key``.

        Raises:
            SignatureError: reason ``unsigned`` or ``bad_signature``.
            ReplayError: reason ``replay``.
        """
        sender, sig, nonce = header.sender, header.sig, header.nonce
        if sig is None or nonce is None:
            raise SignatureError(
                f"unsigned: state from {sender!r} has no signature", reason="unsigned"
            )
        if public_key is None:
            raise SignatureError(f"unsigned: {sender!r} announced no key", reason="unsigned")
        try:
            announced = bytes(_verify_key(public_key, error=SignatureError))
            if header.pubkey is not None and header.pubkey != announced:
                raise SignatureError(f"{sender!r} names a key other than the one it announced")
            verify_update(
                announced,
                sig,
                info_hash=self.info_hash,
                round=header.round,
                sender=sender,
                receiver=None,
                payload_sha256=header.payload_sha256,
                nonce=nonce,
            )
        except MessageError as exc:  # SignatureError, or a field verify_update refuses
            raise SignatureError(f"bad_signature: {exc}", reason="bad_signature") from None
        if header.round > self.last_round:
            raise ReplayError(
                f"replay: round {header.round} from {sender!r} is past the session's last "
                f"round {self.last_round}",
                reason="replay",
            )
        update = (nonce, header.payload_sha256)
        with self._lock:
            admitted = self._admitted.setdefault(sender, {})
            if admitted.get(header.round) == update:
                return
            try:
                self.guard.admit(sender, round=header.round, nonce=nonce)
            except ReplayError as exc:
                raise ReplayError(f"replay: {exc}", reason="replay") from None
            admitted[header.round] = update
            oldest = (self.guard.newest_round(sender) or 0) - self.guard.window
            for old in [r for r in admitted if r < oldest]:
                del admitted[old]


def public_keys_from(mapping: Mapping[str, str | bytes]) -> dict[str, bytes]:
    """Normalise ``peer -> Ed25519 public key (hex or raw)`` to raw 32-byte keys.

    Raises:
        ConfigError: a key that is not a valid Ed25519 public key.
    """
    return {peer: bytes(_verify_key(key, error=ConfigError)) for peer, key in mapping.items()}


def _verify_key(public_key: bytes | str, *, error: type[Exception]) -> Any:
    raw: bytes
    if isinstance(public_key, str):
        if not _HEX64.fullmatch(public_key):
            raise error("a hex Ed25519 public key is 64 lowercase hex characters")
        raw = bytes.fromhex(public_key)
    elif isinstance(public_key, bytes) and len(public_key) == 32:
        raw = public_key
    else:
        raise error("an Ed25519 public key is 32 bytes or 64 hex characters")
    try:
        return nacl.signing.VerifyKey(raw)
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise error(f"not an Ed25519 public key: {exc}") from exc


def _check_text(name: str, value: object) -> None:
    if not (isinstance(value, str) and 0 < len(value) <= _MAX_NAME):
        raise MessageError(f"{name} must be a non-empty string of at most {_MAX_NAME} characters")


def _create_seed_file(path: Path) -> None:
    """Write a new seed atomically: to a private temporary file, then hard-link it into place."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    _write_private(temporary, (secrets.token_bytes(32).hex() + "\n").encode("ascii"))
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass  # another process created it first: use theirs
    finally:
        temporary.unlink()


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never an existing file) and write ``data`` durably."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is filtered by the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_seed(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"key file {path} has mode {mode:o}; run: chmod 600 {path}")
    with path.open("rb") as file:
        text = file.read(200).decode("ascii", errors="replace").strip()
    if not _HEX64.fullmatch(text):
        raise ConfigError(f"key file {path} does not hold a 64-hex-character Ed25519 seed")
    return bytes.fromhex(text)


def signed_state(
    identity: PeerIdentity,
    payload: bytes,
    *,
    info_hash: str,
    sender: str,
    round: int,
    num_examples: int,
    codec: str | None = None,
    base: int | None = None,
) -> list[bytes]:
    """``[header, payload]`` of one state, signed once for every requester (a peer, the server).

    ``codec`` and ``base`` mark compressed updates (``node.compressed``).
    """
    from fedtorrent.net import wire  # noqa: PLC0415 (torch: the tracker imports this module)
    from fedtorrent.state import state_digest  # noqa: PLC0415

    digest, nonce = state_digest(payload), new_nonce()
    signature = sign_update(
        identity,
        info_hash=info_hash,
        round=round,
        sender=sender,
        receiver=None,  # one signature for the whole cohort: the same state to everyone
        payload_sha256=digest,
        nonce=nonce,
    )
    return wire.encode_message(
        payload,
        info_hash=info_hash,
        sender=sender,
        round=round,
        num_examples=num_examples,
        sig=signature,
        nonce=nonce,
        pubkey=identity.public_key,
        payload_sha256=digest,
        codec=codec,
        base=base,
    )
