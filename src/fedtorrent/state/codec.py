"""State dict <-> bytes with safetensors: never pickle, and check everything on the way in."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedtorrent.errors import StateError

State = dict[str, torch.Tensor]
MAX_STATE_BYTES = 1 << 30
"""Refuse anything larger than 1 GiB before parsing it."""


def encode_state(state: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise tensors (made contiguous, detached, on CPU) in sorted key order."""
    tensors = {k: state[k].detach().to("cpu").contiguous() for k in sorted(state)}
    return bytes(st_save(tensors))


def state_digest(payload: bytes) -> str:
    """Hex sha256 of encoded state: what torrents, headers and ledgers refer to."""
    return hashlib.sha256(payload).hexdigest()


def decode_state(
    payload: bytes,
    *,
    like: Mapping[str, torch.Tensor] | None = None,
    max_bytes: int = MAX_STATE_BYTES,
) -> State:
    """Parse safetensors bytes; with ``like``, keys, shapes and dtypes must match it exactly.

    Raises:
        StateError: oversized, unparsable, mismatched or non-finite input.
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise StateError(f"state payload must be bytes, not {type(payload).__name__}")
    if len(payload) > max_bytes:
        raise StateError(f"state payload of {len(payload)} bytes exceeds the {max_bytes} limit")
    _check_header(bytes(payload[:8]), len(payload))
    try:
        state = st_load(bytes(payload))
    except Exception as exc:  # safetensors raises its own untyped errors
        raise StateError(f"state payload is not valid safetensors: {exc}") from exc
    if like is not None:
        check_state_like(state, like)
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise StateError(f"state tensor {key!r} holds NaN or infinite values")
    return state


def check_state_like(state: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> None:
    """Raise StateError unless ``state`` has exactly the keys, shapes and dtypes of ``like``."""
    missing, extra = sorted(set(like) - set(state)), sorted(set(state) - set(like))
    if missing or extra:
        raise StateError(f"state keys differ: missing {missing}, unexpected {extra}")
    for key, ref in like.items():
        got = state[key]
        if got.shape != ref.shape:
            raise StateError(
                f"state tensor {key!r} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
            )
        if got.dtype != ref.dtype:
            raise StateError(f"state tensor {key!r} has dtype {got.dtype}, expected {ref.dtype}")


def _check_header(prefix: bytes, total: int) -> None:
    """Check the 8-byte header length before safetensors allocates anything."""
    if len(prefix) < 8:
        raise StateError("state payload is shorter than a safetensors header")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > total - 8 or header_len > 100_000_000:
        raise StateError(f"safetensors header length {header_len} does not fit the payload")


def state_summary(state: Mapping[str, torch.Tensor]) -> str:
    """A JSON description (key -> shape, dtype) used in messages and torrents."""
    return json.dumps({k: [list(v.shape), str(v.dtype)] for k, v in sorted(state.items())})
