"""A peer's atomic checkpoint: the model after round ``r`` plus what it needs to go on from there.

Two files in the peer's folder, each written to a temporary file and moved into place with
``os.replace``, so a crash leaves either the old or the new version, never half of one:

- ``checkpoint.safetensors``: the model tensors (and the tensors of the sender and privacy
  state), with the whole record (round, trust logits, last metrics, seeds, traffic totals, the
  neighbour book, the plain part of the privacy state) as JSON in the safetensors metadata under
  ``fedtorrent``. This file alone is the commit point, so a crash between the two renames
  cannot pair the model of one round with the trust state of another.
- ``checkpoint.json``: the same record for people and scripts (``jq``, the swarm launcher).

Loading reads only the safetensors file and trusts nothing in it: size first, the metadata's
types and ranges, the session it belongs to, then the tensors against the session's model.

A private session's checkpoint holds the peer's privacy state, its secret noise seed included:
the folder is the peer's own, as private as its keys, and never shared.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from fedtorrent.errors import StateError
from fedtorrent.files import write_atomic
from fedtorrent.metrics.records import clean, write_json
from fedtorrent.state.codec import MAX_STATE_BYTES, decode_state

MODEL_FILE = "checkpoint.safetensors"
RECORD_FILE = "checkpoint.json"
FORMAT = 1
_META_KEY = "fedtorrent"
PUBLIC = "__public__."
"""Prefix of the sender-state tensors in a checkpoint (never a model key: state keys are module
paths)."""
PRIVATE = "__privacy__."
"""Prefix of the privacy-state tensors: ``__privacy__.<group>.<key>``."""
_MAX_META_BYTES = 16 << 20
"""The record (mostly trust logits, one float per peer ever seen) stays far below this."""

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Checkpoint:
    """What a peer saves after a round; ``state`` is its model after mixing.

    ``trust`` is ``TrustLearner.state_dict()`` (``{}`` for rules without trust); ``metrics`` the
    round's record; ``seeds`` the seeds its random draws derive from; ``totals`` traffic and
    rejection counters carried across restarts.
    """

    info_hash: str
    peer_id: str
    round: int
    state: State = field(repr=False)
    trust: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    seeds: Mapping[str, int] = field(default_factory=dict)
    totals: Mapping[str, Any] = field(default_factory=dict)
    neighbours: Mapping[str, Any] = field(default_factory=dict)
    """``NeighbourBook.state_dict()``: who answered, who is backed off (``node.neighbours``)."""
    public: State = field(default_factory=dict, repr=False)
    """A compressed session's sender state (``CompressedSender.state_dict()``: the public copy,
    so its residual survives a restart); saved beside the model in the same file."""
    privacy: Mapping[str, Any] = field(default_factory=dict)
    """A private session's ``PeerPrivacy.state_dict()`` (``{}`` without privacy, and when loaded
    from a checkpoint written before privacy state was saved). Its tensor groups (values that
    are non-empty ``{name: tensor}`` dicts) go into the safetensors file under ``PRIVATE``, the
    rest into the record's ``privacy``."""

    def record(self) -> dict[str, Any]:
        """The JSON record (everything but the tensors)."""
        groups = tensor_groups(self.privacy)
        return {
            "format": FORMAT,
            "info_hash": self.info_hash,
            "peer_id": self.peer_id,
            "round": self.round,
            "trust": dict(self.trust),
            "metrics": dict(self.metrics),
            "seeds": dict(self.seeds),
            "totals": dict(self.totals),
            "neighbours": dict(self.neighbours),
            "privacy": {k: v for k, v in self.privacy.items() if k not in groups},
        }


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write both files atomically (safetensors first: it is the commit point); return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = checkpoint.record()
    text = json.dumps(clean(record), sort_keys=True, allow_nan=False)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(checkpoint.state.items())}
    tensors.update(
        {PUBLIC + k: v.detach().to("cpu").contiguous() for k, v in checkpoint.public.items()}
    )
    for group, members in tensor_groups(checkpoint.privacy).items():
        tensors.update(
            {f"{PRIVATE}{group}.{k}": v.detach().to("cpu").contiguous() for k, v in members.items()}
        )
    payload = bytes(st_save(tensors, metadata={_META_KEY: text}))
    target = directory / MODEL_FILE
    write_atomic(target, payload)
    write_json(directory / RECORD_FILE, record)
    return target


def load_checkpoint(
    directory: Path,
    *,
    info_hash: str,
    like: Mapping[str, torch.Tensor],
    public_like: Mapping[str, torch.Tensor] | None = None,
    privacy_like: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Read the checkpoint in ``directory`` and check it belongs to this session and model.

    ``public_like``: the sender state a compressed session saves (its keys, shapes, dtypes);
    None when the session is not compressed. A checkpoint without it (written before, or by a
    session that was not compressed) loads with ``public`` empty.

    ``privacy_like``: a private session's fresh ``PeerPrivacy.state_dict()``, whose tensor groups
    give the keys, shapes and dtypes expected; None without privacy. A checkpoint without privacy
    state loads with ``privacy`` empty (the caller decides whether to refuse it); otherwise the
    privacy state comes back whole, its tensors checked here and the rest left to the privacy
    object's ``load_state_dict``.

    Raises:
        StateError: missing, oversized, malformed, of another session, or tensors whose keys,
            shapes or dtypes differ from ``like`` (or that hold non-finite values).
    """
    path = Path(directory) / MODEL_FILE
    try:
        size = path.stat().st_size
        if size > MAX_STATE_BYTES + _MAX_META_BYTES:
            raise StateError(f"{path}: {size} bytes is more than a checkpoint can hold")
        payload = path.read_bytes()
    except OSError as exc:
        raise StateError(f"cannot read checkpoint {path}: {exc}") from exc
    record = _read_record(payload, path)
    if record["info_hash"] != info_hash:
        raise StateError(f"{path} belongs to session {record['info_hash'][:16]}..., not this one")
    expected = dict(like)
    if public_like is not None and _has_public(payload):
        expected.update({PUBLIC + k: v for k, v in public_like.items()})
    groups = tensor_groups(privacy_like or {}) if record["privacy"] else {}
    for group, members in groups.items():
        expected.update({f"{PRIVATE}{group}.{k}": v for k, v in members.items()})
    state = decode_state(payload, like=expected, max_bytes=MAX_STATE_BYTES + _MAX_META_BYTES)
    public = {k[len(PUBLIC) :]: state.pop(k) for k in [k for k in state if k.startswith(PUBLIC)]}
    privacy = dict(record["privacy"])
    for group, members in groups.items():
        privacy[group] = {k: state.pop(f"{PRIVATE}{group}.{k}") for k in members}
    return Checkpoint(
        info_hash=record["info_hash"],
        peer_id=record["peer_id"],
        round=record["round"],
        state=state,
        trust=record["trust"],
        metrics=record["metrics"],
        seeds=record["seeds"],
        totals=record["totals"],
        neighbours=record["neighbours"],
        public=public,
        privacy=privacy,
    )


def tensor_groups(state: Mapping[str, Any]) -> dict[str, Mapping[str, torch.Tensor]]:
    """The values of ``state`` that are non-empty ``{name: tensor}`` dicts, by key."""
    return {
        key: value
        for key, value in state.items()
        if isinstance(value, Mapping)
        and value
        and all(isinstance(t, torch.Tensor) for t in value.values())
    }


def _has_public(payload: bytes) -> bool:
    """Whether a checkpoint's safetensors header names sender-state tensors."""
    (header_len,) = struct.unpack("<Q", payload[:8])
    return f'"{PUBLIC}'.encode() in payload[8 : 8 + header_len]


def _read_record(payload: bytes, path: Path) -> dict[str, Any]:
    """The metadata record of a safetensors checkpoint, with its types checked."""
    if len(payload) < 8:
        raise StateError(f"{path} is too short to be a checkpoint")
    (header_len,) = struct.unpack("<Q", payload[:8])
    if header_len > min(len(payload) - 8, _MAX_META_BYTES + (1 << 20)):
        raise StateError(f"{path}: safetensors header length {header_len} does not fit")
    try:
        header = json.loads(payload[8 : 8 + header_len])
        record = json.loads(header["__metadata__"][_META_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"{path} holds no fedtorrent checkpoint record ({exc})") from None
    expected: dict[str, type | tuple[type, ...]] = {
        "format": int,
        "info_hash": str,
        "peer_id": str,
        "round": int,
        "trust": dict,
        "metrics": dict,
        "seeds": dict,
        "totals": dict,
    }
    if not isinstance(record, dict):
        raise StateError(f"{path}: checkpoint record is not an object")
    record.setdefault("neighbours", {})  # checkpoints written before the neighbour book
    record.setdefault("privacy", {})  # and before privacy state: the peer refuses those
    expected["neighbours"] = expected["privacy"] = dict
    for key, kind in expected.items():
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            raise StateError(f"{path}: checkpoint field {key!r} is missing or of the wrong type")
    if record["format"] != FORMAT:
        raise StateError(f"{path}: checkpoint format {record['format']}, expected {FORMAT}")
    if record["round"] < 0:
        raise StateError(f"{path}: checkpoint round {record['round']} is negative")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in record["seeds"].values()):
        raise StateError(f"{path}: checkpoint seeds must be integers")
    return record
