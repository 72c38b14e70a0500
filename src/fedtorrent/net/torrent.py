"""The session file: a bencoded, BitTorrent-shaped metainfo whose ``info`` dict fixes the session.

The info-hash (sha256 hex of the bencoded ``info`` dict) is the session id: the tracker keys swarms
by it and every peer that holds the same torrent trains the same model on the same settings from
the same verified initial weights. Bencode has no floats, so floats travel as the canonical decimal
string Python's ``repr`` writes (shortest round-trip form) and are read back by the dataclass field
types; free-form dicts (model kwargs, compression) travel as canonical JSON strings. Only
canonical encodings are accepted, so decoding and re-encoding give the same bytes and hash.
Reading never trusts the file: sizes first, then types, then every key; errors name the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import fastbencode

from fedtorrent.config import (
    LR_SCHEDULES,
    SIM_ONLY_RULES,
    DataConfig,
    MixingConfig,
    ModelConfig,
    PrivacyConfig,
    TrainConfig,
    check_private_mixing,
)
from fedtorrent.errors import ConfigError, TorrentError
from fedtorrent.files import write_atomic

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
"""The only ``info.version`` this code reads and writes."""
MAX_TORRENT_BYTES = 1 << 20
"""Refuse torrent files above 1 MiB before decoding them."""
MAX_INITIAL_STATE_BYTES = 1 << 30
"""Equal to ``state.codec.MAX_STATE_BYTES``; repeated so reading a torrent does not import torch."""
MAX_NAME_CHARS = 200
MAX_TEXT_CHARS = 4096
MAX_URL_CHARS = 2048
MAX_JSON_BYTES = 64 * 1024
MAX_JSON_DEPTH = 16
"""Nesting of ``[``/``{`` a JSON text in a torrent may have; checked before ``json.loads``."""
MAX_STATE_OVERHEAD = 1 << 20
"""Bytes a state file may hold beyond its model's parameters (the safetensors header)."""
MAX_COUNT = 1_000_000
"""The largest integer a torrent field may hold (rounds, nodes, batch sizes...), except seeds
(below 2**63), ``info.state.size`` (its own limit) and ``creation date``."""
MAX_SEED = 2**63 - 1
MAX_CREATION_DATE = 253_402_300_799
"""9999-12-31 23:59:59 UTC, the last second ``time.gmtime`` can show everywhere."""
MAX_ALLOW_KEYS = 10_000
"""Public keys a closed swarm's allow-list may hold (10k keys is 650 kB of the 1 MiB file)."""
_HEX = frozenset("0123456789abcdef")
_LOCAL_ONLY = {DataConfig: frozenset({"data_dir"})}
"""Fields that describe one machine, never the session: a peer fills them in itself."""
_ADDED_LATER = {
    MixingConfig: frozenset({"plausibility", "skip_below", "skip_after", "trust_decay"}),
    DataConfig: frozenset({"clusters"}),
    PrivacyConfig: frozenset({"trust_clip", "trust_noise"}),
}
"""Fields added after format version 1: written only when they differ from their default and
read as the default when absent, so older torrents keep their bytes and their info-hash."""
TASK_MODEL = "task"
"""``info.model.name`` and ``info.data.dataset`` of a task session: placeholders, never a registry
name, so a built-in reader refuses such a torrent instead of training the wrong model."""
MAX_TASK_LABEL_CHARS = 200
_TOP_KEYS = frozenset(
    {"announce", "announce-list", "comment", "created by", "creation date", "info"}
)


def bencode(value: Any) -> bytes:
    """Bencode ``value`` (dict keys must be bytes); a typed door to fastbencode."""
    return bytes(fastbencode.bencode(value))  # type: ignore[attr-defined]


def bdecode(payload: bytes) -> Any:
    """Decode bencode strictly (sorted keys, no junk, no leading zeros); ValueError otherwise."""
    return fastbencode.bdecode(payload)  # type: ignore[attr-defined]


def format_float(value: float) -> str:
    """The one decimal form a torrent stores a float in: Python's shortest round-trip ``repr``."""
    if not math.isfinite(value):
        raise ConfigError(f"cannot store non-finite float {value!r} in a torrent")
    return repr(float(value))


def canonical_json(value: Mapping[str, Any]) -> str:
    """Sorted keys, no spaces, no NaN: the one JSON text a torrent stores a free-form dict as."""
    try:
        return json.dumps(dict(value), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot store {value!r} in a torrent as JSON: {exc}") from exc


def is_info_hash(text: str) -> bool:
    """True for 64 lowercase hex characters, the only spelling of an info-hash fedtorrent uses."""
    return len(text) == 64 and _HEX.issuperset(text)


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What a task session's torrent says about its task: a label and the state schema.

    Text and plain data only: a torrent never names code to import. The peer brings its task
    (``--task PATH.py:NAME``) and checks its model against ``schema``
    (:func:`fedtorrent.state.schema.check_schema`). ``schema`` is validated on construction
    (:func:`fedtorrent.state.schema.validate_schema`: field names, dtypes, policies, limits).
    """

    label: str
    schema: Mapping[str, Any]

    def __post_init__(self) -> None:
        from fedtorrent.errors import StateError  # noqa: PLC0415
        from fedtorrent.state.schema import validate_schema  # noqa: PLC0415 (imports torch)

        _check(
            0 < len(self.label) <= MAX_TASK_LABEL_CHARS and self.label.isprintable(),
            f"task label must be 1 to {MAX_TASK_LABEL_CHARS} printable characters, "
            f"got {self.label!r}",
        )
        try:
            object.__setattr__(self, "schema", validate_schema(self.schema))
        except StateError as exc:
            raise ConfigError(str(exc)) from exc

    def state_bytes(self) -> tuple[int, int]:
        """The bytes of tensor data the schema describes, and the most a state file may add.

        The allowance is :data:`MAX_STATE_OVERHEAD` plus a safetensors header entry per key.
        """
        from fedtorrent.state.schema import DTYPES  # noqa: PLC0415

        data = header = 0
        for key, entry in self.schema["tensors"].items():
            count = math.prod(entry["shape"])
            data += count * DTYPES[entry["dtype"]].itemsize
            header += len(key.encode()) + 128 + 24 * len(entry["shape"])
        return data, MAX_STATE_OVERHEAD + header


@dataclasses.dataclass(frozen=True)
class Session:
    """Everything peers must agree on before round one; the ``info`` dict of a torrent.

    ``data`` never carries a ``data_dir``: where a peer keeps its files is its own business.
    ``state_sha256`` and ``state_size`` pin the initial weights (a safetensors file).
    ``privacy`` is None when peers share updates without noise; ``compression`` is None (whole
    states) or ``{"codec": spec}``, the canonical spelling of a :mod:`fedtorrent.state.compress`
    spec, parsed by every peer. ``allow_keys`` makes the swarm closed: the Ed25519 public
    keys (64 lowercase hex, sorted, no repeats) of the only peers that may take part; empty means
    open (any key) and leaves the key out of the ``info`` dict. ``round_schedule`` moves the local
    learning rate across rounds exactly as ``SimConfig.round_schedule`` does (``constant`` or
    ``cosine``, see :func:`fedtorrent.training.schedule.round_lr_scale`); ``constant`` leaves the
    key out, so torrents written before it existed keep their bytes and info-hash.
    ``task`` (a :class:`TaskInfo`) marks a session made with ``fedtorrent create --task``: its
    ``model.name`` and ``data.dataset`` are then :data:`TASK_MODEL`, placeholders; built-in
    sessions leave the key out of the ``info`` dict, so their info-hash is unchanged.
    """

    name: str
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    mixing: MixingConfig
    rounds: int
    cohort_size: int
    state_sha256: str
    state_size: int
    privacy: PrivacyConfig | None = None
    compression: Mapping[str, Any] | None = None
    allow_keys: tuple[str, ...] = ()
    round_schedule: str = "constant"
    task: TaskInfo | None = None
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check(
            0 < len(self.name) <= MAX_NAME_CHARS and self.name.isprintable(),
            f"name must be 1 to {MAX_NAME_CHARS} printable characters, got {self.name!r}",
        )
        _check(self.data.data_dir is None, "a session never carries a local data_dir")
        _check(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")
        _check(self.cohort_size >= 1, f"cohort_size must be >= 1, got {self.cohort_size}")
        _check(
            self.round_schedule in LR_SCHEDULES,
            f"round_schedule must be one of {', '.join(LR_SCHEDULES)}; got {self.round_schedule!r}",
        )
        _check(
            is_info_hash(self.state_sha256),
            f"state_sha256 must be 64 lowercase hex characters, got {self.state_sha256!r}",
        )
        _check(
            0 < self.state_size <= MAX_INITIAL_STATE_BYTES,
            f"state_size must be in [1, {MAX_INITIAL_STATE_BYTES}], got {self.state_size}",
        )
        _check(
            self.version == FORMAT_VERSION,
            f"version must be {FORMAT_VERSION}, got {self.version}",
        )
        _check(bool(self.model.name), "model name must not be empty")
        _check(
            self.mixing.rule not in SIM_ONLY_RULES,
            f"mixing rule {self.mixing.rule!r} is simulator-only: a peer cannot know its "
            "neighbours' true clusters",
        )
        if self.privacy is not None and self.privacy.example_level:
            check_private_mixing(self.mixing)
        if self.compression is not None:
            canonical_json(self.compression)  # raises ConfigError when not JSON-able
            codec = self.compression.get("codec")
            _check(
                set(self.compression) == {"codec"}
                and isinstance(codec, str)
                and 0 < len(codec) <= 32
                and codec.isascii()
                and codec.isprintable(),
                'compression must be {"codec": SPEC} (state.compress; checked by peers)',
            )
        canonical_json(self.model.kwargs)
        _check(
            isinstance(self.allow_keys, tuple) and len(self.allow_keys) <= MAX_ALLOW_KEYS,
            f"allow_keys must be a tuple of at most {MAX_ALLOW_KEYS} keys",
        )
        for key in self.allow_keys:
            _check(
                isinstance(key, str) and is_info_hash(key),
                f"allow_keys: {key!r} is not an Ed25519 public key as 64 lowercase hex characters",
            )
        _check(
            list(self.allow_keys) == sorted(set(self.allow_keys)),
            "allow_keys must be sorted and hold each key once",
        )
        placeholders = (self.model.name == TASK_MODEL, self.data.dataset == TASK_MODEL)
        if self.task is None:
            _check(
                not any(placeholders),
                f"model or dataset {TASK_MODEL!r} is a task session's placeholder; it needs a task",
            )
        else:
            _check(
                all(placeholders) and not self.model.kwargs,
                f"a task session's model and dataset are {TASK_MODEL!r}, with no model arguments",
            )
            data, overhead = self.task.state_bytes()
            _check(
                data <= self.state_size <= data + overhead,
                f"the task's schema describes {data} bytes of state, which a state of "
                f"{self.state_size} bytes cannot hold",
            )

    @property
    def is_task(self) -> bool:
        """True for a session made with ``create --task`` (peers must bring the task)."""
        return self.task is not None

    @property
    def closed(self) -> bool:
        """True when only the peers in ``allow_keys`` may take part."""
        return bool(self.allow_keys)

    def to_info(self) -> dict[bytes, Any]:
        """The bencodable ``info`` dict (keys as bytes, floats as canonical decimal strings)."""
        info: dict[bytes, Any] = {
            b"version": self.version,
            b"name": self.name.encode(),
            b"model": _encode_fields(self.model),
            b"data": _encode_fields(self.data),
            b"train": _encode_fields(self.train),
            b"mixing": _encode_fields(self.mixing),
            b"rounds": self.rounds,
            b"cohort_size": self.cohort_size,
            b"state": {b"sha256": self.state_sha256.encode(), b"size": self.state_size},
        }
        if self.privacy is not None:
            info[b"privacy"] = _encode_fields(self.privacy)
        if self.compression is not None:
            info[b"compression"] = canonical_json(self.compression).encode()
        if self.allow_keys:
            info[b"allow_keys"] = [key.encode() for key in self.allow_keys]
        if self.round_schedule != "constant":
            info[b"round_schedule"] = self.round_schedule.encode()
        if self.task is not None:
            info[b"task"] = {
                b"label": self.task.label.encode(),
                b"schema": _encode_schema(self.task.schema),
            }
        return info

    @classmethod
    def from_info(cls, info: object) -> Session:
        """Read an ``info`` dict strictly.

        Raises:
            TorrentError: a wrong type, a missing or unknown key, an unsupported version, a
                non-canonical float or JSON text, or a value its config rejects; names the field.
        """
        raw = _as_dict(info, "info")
        if b"version" not in raw:
            raise TorrentError("info.version: missing key")
        version = _int(raw[b"version"], "info.version", high=MAX_SEED)
        if version != FORMAT_VERSION:
            raise TorrentError(
                f"info.version: unsupported format version {version} (this fedtorrent reads "
                f"{FORMAT_VERSION})"
            )
        required = {"version", "name", "model", "data", "train", "mixing", "rounds"}
        required |= {"cohort_size", "state"}
        optional = {"privacy", "compression", "allow_keys", "round_schedule", "task"}
        _check_keys(raw, required=required, optional=optional, where="info")
        state = _as_dict(raw[b"state"], "info.state")
        _check_keys(state, required={"sha256", "size"}, optional=set(), where="info.state")
        values: dict[str, Any] = {
            "name": _text(raw[b"name"], "info.name", MAX_NAME_CHARS),
            "model": _decode_fields(ModelConfig, raw[b"model"], "info.model"),
            "data": _decode_fields(DataConfig, raw[b"data"], "info.data"),
            "train": _decode_fields(TrainConfig, raw[b"train"], "info.train"),
            "mixing": _decode_fields(MixingConfig, raw[b"mixing"], "info.mixing"),
            "rounds": _int(raw[b"rounds"], "info.rounds"),
            "cohort_size": _int(raw[b"cohort_size"], "info.cohort_size"),
            "state_sha256": _text(state[b"sha256"], "info.state.sha256", 64),
            "state_size": _int(state[b"size"], "info.state.size", high=MAX_INITIAL_STATE_BYTES),
        }
        if b"privacy" in raw:
            if isinstance(raw[b"privacy"], dict) and b"dp_sgd" in raw[b"privacy"]:
                raise TorrentError(
                    "info.privacy.dp_sgd: a torrent of an older fedtorrent; DP-SGD is now "
                    "info.privacy.unit (node or example): create the session again"
                )
            values["privacy"] = _decode_fields(PrivacyConfig, raw[b"privacy"], "info.privacy")
        if b"compression" in raw:
            values["compression"] = _json(raw[b"compression"], "info.compression")
        if b"allow_keys" in raw:
            keys = _as_list(raw[b"allow_keys"], "info.allow_keys")
            if not 0 < len(keys) <= MAX_ALLOW_KEYS:
                raise TorrentError(f"info.allow_keys: 1 to {MAX_ALLOW_KEYS} keys, got {len(keys)}")
            values["allow_keys"] = tuple(
                _text(key, f"info.allow_keys[{i}]", 64) for i, key in enumerate(keys)
            )
        if b"round_schedule" in raw:
            values["round_schedule"] = _text(raw[b"round_schedule"], "info.round_schedule", 40)
        if b"task" in raw:
            values["task"] = _decode_task(raw[b"task"])
        try:
            return cls(**values)
        except ConfigError as exc:
            raise TorrentError(f"info: {exc}") from exc

    @cached_property
    def info_hash(self) -> str:
        """sha256 hex of the bencoded ``info`` dict: the session id."""
        return hashlib.sha256(bencode(self.to_info())).hexdigest()


@dataclasses.dataclass(frozen=True)
class Torrent:
    """A session plus where to find its tracker; BitTorrent metainfo keys at the top level."""

    announce: str
    session: Session
    announce_list: tuple[tuple[str, ...], ...] = ()
    creation_date: int | None = None
    """Unix seconds."""
    created_by: str | None = None
    comment: str | None = None

    def __post_init__(self) -> None:
        for url in (self.announce, *(u for tier in self.announce_list for u in tier)):
            _check_url(url)
        _check(all(self.announce_list), "announce_list tiers must not be empty")
        _check(
            self.creation_date is None or 0 <= self.creation_date <= MAX_CREATION_DATE,
            f"creation_date must be in [0, {MAX_CREATION_DATE}] (Unix seconds), "
            f"got {_clip_number(self.creation_date)}",
        )
        for label, text in (("created_by", self.created_by), ("comment", self.comment)):
            _check(
                text is None or len(text) <= MAX_TEXT_CHARS,
                f"{label} must be at most {MAX_TEXT_CHARS} characters",
            )

    @property
    def info_hash(self) -> str:
        """The session id (see ``Session.info_hash``)."""
        return self.session.info_hash

    def to_bytes(self) -> bytes:
        """The bencoded torrent file."""
        meta: dict[bytes, Any] = {
            b"announce": self.announce.encode(),
            b"info": self.session.to_info(),
        }
        if self.announce_list:
            meta[b"announce-list"] = [[u.encode() for u in tier] for tier in self.announce_list]
        if self.creation_date is not None:
            meta[b"creation date"] = self.creation_date
        if self.created_by is not None:
            meta[b"created by"] = self.created_by.encode()
        if self.comment is not None:
            meta[b"comment"] = self.comment.encode()
        return bytes(bencode(meta))

    @classmethod
    def from_bytes(cls, payload: bytes) -> Torrent:
        """Decode a torrent file strictly.

        Raises:
            TorrentError: oversized, not bencode, or any field wrong (the message names it).
        """
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TorrentError(f"torrent must be bytes, not {type(payload).__name__}")
        if len(payload) > MAX_TORRENT_BYTES:
            raise TorrentError(
                f"torrent of {len(payload)} bytes exceeds the {MAX_TORRENT_BYTES} byte limit"
            )
        try:
            meta = bdecode(bytes(payload))
        except (ValueError, TypeError) as exc:
            raise TorrentError(f"torrent is not valid bencode: {exc}") from exc
        top = _as_dict(meta, "torrent")
        _check_keys(
            top,
            required={"announce", "info"},
            optional=_TOP_KEYS - {"announce", "info"},
            where="torrent",
        )
        session = Session.from_info(top[b"info"])
        if bencode(session.to_info()) != bencode(top[b"info"]):
            raise TorrentError("info: not in canonical form; re-encoding it changes its hash")
        tiers: tuple[tuple[str, ...], ...] = ()
        if b"announce-list" in top:
            raw_tiers = _as_list(top[b"announce-list"], "announce-list")
            tiers = tuple(
                tuple(
                    _text(u, f"announce-list[{i}][{j}]", MAX_URL_CHARS)
                    for j, u in enumerate(_as_list(tier, f"announce-list[{i}]"))
                )
                for i, tier in enumerate(raw_tiers)
            )
        optional_text = {
            key: _text(top[key.encode()], key, MAX_TEXT_CHARS) if key.encode() in top else None
            for key in ("created by", "comment")
        }
        date = top.get(b"creation date")
        try:
            return cls(
                announce=_text(top[b"announce"], "announce", MAX_URL_CHARS),
                session=session,
                announce_list=tiers,
                creation_date=None
                if date is None
                else _int(date, "creation date", high=MAX_CREATION_DATE),
                created_by=optional_text["created by"],
                comment=optional_text["comment"],
            )
        except ConfigError as exc:
            raise TorrentError(f"torrent: {exc}") from exc


def load_torrent(source: str | Path | bytes) -> Torrent:
    """Read a torrent from a file path or from its bytes; the size is checked before reading.

    Raises:
        TorrentError: missing, oversized or malformed.
    """
    if isinstance(source, bytes | bytearray):
        return Torrent.from_bytes(bytes(source))
    path = Path(source)
    try:
        size = path.stat().st_size
        if size > MAX_TORRENT_BYTES:
            raise TorrentError(f"{path}: {size} bytes exceeds the {MAX_TORRENT_BYTES} byte limit")
        payload = path.read_bytes()
    except OSError as exc:
        raise TorrentError(f"cannot read torrent {path}: {exc}") from exc
    return Torrent.from_bytes(payload)


def save_torrent(torrent: Torrent, path: str | Path) -> Path:
    """Write the bencoded torrent to ``path`` atomically (folders made) and return the path.

    Raises:
        TorrentError: the torrent would not read back (a value beyond what a reader accepts).
        OSError: the file cannot be written.
    """
    payload = torrent.to_bytes()
    Torrent.from_bytes(payload)  # what a peer would refuse is never written
    return write_atomic(path, payload)


def save_session(torrent: Torrent, path: str | Path, state: bytes) -> tuple[Path, Path]:
    """Write a torrent and its initial state (beside it, see :func:`state_path_for`) together.

    Both are checked first (the torrent reads back, the state matches its size and sha256),
    then the state is written atomically and the torrent after it, so a torrent is never left
    without its state; if the torrent cannot be written the new state is removed again.
    Returns ``(torrent_path, state_path)``.

    Raises:
        TorrentError: the torrent would not read back or the state does not match it.
        OSError: a file cannot be written (folders are made when missing).
    """
    verify_initial_state(torrent, state)
    Torrent.from_bytes(torrent.to_bytes())
    state_path = write_atomic(state_path_for(path), state)
    try:
        return save_torrent(torrent, path), state_path
    except BaseException:
        state_path.unlink(missing_ok=True)
        raise


def state_path_for(torrent_path: str | Path) -> Path:
    """Where ``fedtorrent create`` puts the initial state: beside the torrent, suffix ``.state``."""
    return Path(torrent_path).with_suffix(".state")


def check_model_size(session: Session) -> int | None:
    """Bytes of parameters the session's model would hold, checked against its pinned state.

    Computed from the model's size formula and the dataset's input shape, without building it
    (nor importing torch), so a torrent whose model arguments describe a huge model is refused
    before anything is allocated. The state file holds those bytes plus a header, so its size
    must lie in ``[bytes, bytes + MAX_STATE_OVERHEAD]``. Returns None when the size cannot be
    known this way (a dataset without a known shape, a model without a formula);
    ``build_model`` still checks it on the meta device. A task session answers with the bytes
    of tensor data its state schema describes.

    Raises:
        TorrentError: naming ``info.model``: the arguments are refused, or the size is wrong.
    """
    from fedtorrent.data.datasets import CLASSES, INPUT_SHAPES  # noqa: PLC0415
    from fedtorrent.models import state_bytes  # noqa: PLC0415

    if session.task is not None:  # checked against the state size when the session was built
        return session.task.state_bytes()[0]
    dataset, model = session.data.dataset, session.model
    if dataset not in INPUT_SHAPES:
        return None
    try:
        size = state_bytes(
            model.name,
            input_shape=INPUT_SHAPES[dataset],
            num_classes=len(CLASSES[dataset]),
            **model.kwargs,
        )
    except ConfigError as exc:
        raise TorrentError(f"info.model: {exc}") from None
    if size is not None and not size <= session.state_size <= size + MAX_STATE_OVERHEAD:
        raise TorrentError(
            f"info.model: {model.name!r} on {dataset} holds {size} bytes of parameters, which "
            f"a state of {session.state_size} bytes (info.state.size) cannot be"
        )
    return size


def verify_initial_state(torrent: Torrent, payload: bytes) -> None:
    """Check state bytes against the size and sha256 the torrent pins.

    Raises:
        TorrentError: naming ``info.state.size`` or ``info.state.sha256``.
    """
    check_initial_state(torrent, size=len(payload), sha256=hashlib.sha256(payload).hexdigest())


def check_initial_state(torrent: Torrent, *, size: int, sha256: str) -> None:
    """Check a state's size and sha256 hex (e.g. counted while streaming it) against the torrent.

    Raises:
        TorrentError: naming ``info.state.size`` or ``info.state.sha256``.
    """
    session = torrent.session
    if size != session.state_size:
        raise TorrentError(
            f"info.state.size: state has {size} bytes, the torrent says {session.state_size}"
        )
    if sha256 != session.state_sha256:
        raise TorrentError(
            f"info.state.sha256: state hashes to {sha256}, the torrent says {session.state_sha256}"
        )


def load_initial_state(torrent: Torrent, path: str | Path) -> dict[str, torch.Tensor]:
    """Read, verify and decode the initial weights a torrent pins.

    Raises:
        TorrentError: the file is missing or its size or hash differs from the torrent's.
        StateError: the bytes verify but are not a valid state (a torrent made wrongly).
    """
    from fedtorrent.state import decode_state  # noqa: PLC0415  (torch only when weights load)

    source = Path(path)
    try:
        size = source.stat().st_size
        if size != torrent.session.state_size:
            raise TorrentError(
                f"info.state.size: {source} has {size} bytes, the torrent says "
                f"{torrent.session.state_size}"
            )
        payload = source.read_bytes()
    except OSError as exc:
        raise TorrentError(f"cannot read initial state {source}: {exc}") from exc
    verify_initial_state(torrent, payload)
    return decode_state(payload, max_bytes=MAX_INITIAL_STATE_BYTES)


# --- strict field codecs -------------------------------------------------------------------------


_SCHEMA_ENTRY = ("dtype", "kind", "shape", "share")


def _encode_schema(schema: Mapping[str, Any]) -> dict[bytes, Any]:
    """A validated state schema as bencode: the same nesting, text as bytes."""
    return {
        b"version": schema["version"],
        b"buffers": schema["buffers"].encode(),
        b"tensors": {
            key.encode(): {
                b"shape": list(entry["shape"]),
                b"dtype": entry["dtype"].encode(),
                b"kind": entry["kind"].encode(),
                b"share": entry["share"].encode(),
            }
            for key, entry in schema["tensors"].items()
        },
    }


def _decode_task(raw: object) -> TaskInfo:
    """``info.task``: a label and a schema, each value's type and size checked before use."""
    from fedtorrent.state.schema import MAX_DIMS, MAX_KEY_LENGTH, MAX_KEYS  # noqa: PLC0415

    task = _as_dict(raw, "info.task")
    _check_keys(task, required={"label", "schema"}, optional=set(), where="info.task")
    where = "info.task.schema"
    schema = _as_dict(task[b"schema"], where)
    _check_keys(schema, required={"version", "buffers", "tensors"}, optional=set(), where=where)
    tensors = _as_dict(schema[b"tensors"], f"{where}.tensors")
    if len(tensors) > MAX_KEYS:
        raise TorrentError(f"{where}.tensors: more than {MAX_KEYS} keys")
    decoded: dict[str, dict[str, Any]] = {}
    for raw_key, raw_entry in tensors.items():
        key = _text(raw_key, f"{where}.tensors key", MAX_KEY_LENGTH)
        at = f"{where}.tensors[{key!r}]"
        entry = _as_dict(raw_entry, at)
        _check_keys(entry, required=set(_SCHEMA_ENTRY), optional=set(), where=at)
        shape = _as_list(entry[b"shape"], f"{at}.shape")
        if len(shape) > MAX_DIMS:
            raise TorrentError(f"{at}.shape: more than {MAX_DIMS} dimensions")
        decoded[key] = {
            "shape": [_int(d, f"{at}.shape[{i}]", high=MAX_SEED) for i, d in enumerate(shape)],
            **{name: _text(entry[name.encode()], f"{at}.{name}", 40) for name in _SCHEMA_ENTRY
               if name != "shape"},
        }  # fmt: skip
    values = {
        "version": _int(schema[b"version"], f"{where}.version"),
        "buffers": _text(schema[b"buffers"], f"{where}.buffers", 40),
        "tensors": decoded,
    }
    try:
        return TaskInfo(label=_text(task[b"label"], "info.task.label", MAX_TASK_LABEL_CHARS),
                        schema=values)  # fmt: skip
    except ConfigError as exc:
        raise TorrentError(f"info.task: {exc}") from exc


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    _check(
        len(url) <= MAX_URL_CHARS
        and parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and url.isprintable()
        and " " not in url,
        f"tracker URL must be http(s)://host[:port]/path of at most {MAX_URL_CHARS} characters, "
        f"got {url!r}",
    )


def _as_dict(value: object, where: str) -> dict[bytes, Any]:
    if not isinstance(value, dict):
        raise TorrentError(f"{where}: expected a dictionary, got {_kind(value)}")
    return value


def _as_list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise TorrentError(f"{where}: expected a list, got {_kind(value)}")
    return value


def _check_keys(
    raw: dict[bytes, Any], *, required: set[str], optional: set[str] | frozenset[str], where: str
) -> None:
    names = set()
    for key in raw:
        try:
            names.add(key.decode())
        except UnicodeDecodeError as exc:
            raise TorrentError(f"{where}: key {key!r} is not UTF-8") from exc
    unknown = sorted(names - required - set(optional))
    if unknown:
        raise TorrentError(f"{where}.{unknown[0]}: unknown key")
    missing = sorted(required - names)
    if missing:
        raise TorrentError(f"{where}.{missing[0]}: missing key")


def _int(value: object, where: str, *, high: int = MAX_COUNT) -> int:
    """An integer in ``[0, high]``: no torrent field is negative, none unbounded."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TorrentError(f"{where}: expected an integer, got {_kind(value)}")
    if not 0 <= value <= high:
        raise TorrentError(f"{where}: {_clip_number(value)} is not in [0, {high}]")
    return value


def _clip_number(value: object) -> str:
    """An integer for a message: a hostile one may have a million digits."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return str(value)


def _text(value: object, where: str, limit: int) -> str:
    if not isinstance(value, bytes):
        raise TorrentError(f"{where}: expected a string, got {_kind(value)}")
    if len(value) > limit * 4:
        raise TorrentError(f"{where}: longer than {limit} characters")
    try:
        text = value.decode()
    except UnicodeDecodeError as exc:
        raise TorrentError(f"{where}: not UTF-8") from exc
    if len(text) > limit:
        raise TorrentError(f"{where}: longer than {limit} characters")
    return text


def _float(value: object, where: str) -> float:
    text = _text(value, where, 40)
    try:
        number = float(text)
    except ValueError as exc:
        raise TorrentError(f"{where}: {text!r} is not a decimal number") from exc
    if not math.isfinite(number) or repr(number) != text:
        raise TorrentError(
            f"{where}: {text!r} is not a canonical finite decimal (write {repr(number)!r})"
        )
    return number


def _json(value: object, where: str) -> dict[str, Any]:
    text = _text(value, where, MAX_JSON_BYTES)
    if json_depth(text) > MAX_JSON_DEPTH:
        raise TorrentError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not allowed")

    try:
        parsed = json.loads(text, parse_constant=no_constants)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise TorrentError(f"{where}: not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise TorrentError(f"{where}: expected a JSON object, got {_kind(parsed)}")
    if canonical_json(parsed) != text:
        raise TorrentError(f"{where}: JSON is not canonical (sorted keys, no spaces)")
    return parsed


def json_depth(text: str) -> int:
    """The deepest nesting of ``[`` and ``{`` in a JSON text, brackets inside strings ignored.

    A linear scan that needs no recursion, so it can run before ``json.loads`` (which recurses
    once per level and fails with RecursionError past about a thousand).
    """
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _kind(value: object) -> str:
    return {bytes: "string", int: "integer", list: "list", dict: "dictionary"}.get(
        type(value), type(value).__name__
    )


def _field_type(hint: Any, where: str) -> tuple[Any, bool]:
    """Split ``X | None`` into (X, True); anything else into (hint, False)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise ConfigError(f"{where}: union type {hint} cannot be stored in a torrent")
        return args[0], True
    return hint, False


def _encode_fields(obj: Any) -> dict[bytes, Any]:
    """A config dataclass as a bencodable dict; ``None`` fields are left out."""
    skip = _LOCAL_ONLY.get(type(obj), frozenset())
    later = _ADDED_LATER.get(type(obj), frozenset())
    hints = typing.get_type_hints(type(obj))
    out: dict[bytes, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in skip or value is None or (f.name in later and value == f.default):
            continue
        kind, _ = _field_type(hints[f.name], f.name)
        out[f.name.encode()] = _encode_value(value, kind, f"{type(obj).__name__}.{f.name}")
    return out


def _encode_value(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if kind is bool:
        return int(bool(value))
    if kind is int:
        return int(value)
    if kind is float:
        return format_float(float(value)).encode()
    if kind is str:
        return str(value).encode()
    if origin is dict:
        return canonical_json(value).encode()
    if origin is tuple:
        (item,) = [a for a in typing.get_args(kind) if a is not Ellipsis]
        return [_encode_value(v, item, where) for v in value]
    raise ConfigError(f"{where}: type {kind} cannot be stored in a torrent")


def _decode_fields(cls: type[Any], raw: object, where: str) -> Any:
    """Build config ``cls`` from a bencoded dict, reading each value by its field's type."""
    data = _as_dict(raw, where)
    skip = _LOCAL_ONLY.get(cls, frozenset())
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]
    typed = {f.name: _field_type(hints[f.name], f"{where}.{f.name}") for f in fields}
    later = _ADDED_LATER.get(cls, frozenset())
    required = {name for name, (_, optional) in typed.items() if not optional} - later
    _check_keys(data, required=required, optional=set(typed) - required, where=where)
    values = {
        name: _decode_value(data[name.encode()], kind, f"{where}.{name}")
        for name, (kind, _) in typed.items()
        if name.encode() in data
    }
    try:
        return cls(**values)
    except ConfigError as exc:
        raise TorrentError(f"{where}: {exc}") from exc


def _decode_value(value: object, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if kind is bool:
        number = _int(value, where)
        if number not in (0, 1):
            raise TorrentError(f"{where}: expected 0 or 1, got {number}")
        return bool(number)
    if kind is int:
        return _int(value, where, high=MAX_SEED if where.endswith(".seed") else MAX_COUNT)
    if kind is float:
        return _float(value, where)
    if kind is str:
        return _text(value, where, MAX_TEXT_CHARS)
    if origin is dict:
        return _json(value, where)
    if origin is tuple:
        (item,) = [a for a in typing.get_args(kind) if a is not Ellipsis]
        return tuple(
            _decode_value(v, item, f"{where}[{i}]") for i, v in enumerate(_as_list(value, where))
        )
    raise TorrentError(f"{where}: type {kind} cannot be read from a torrent")
