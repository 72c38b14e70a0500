"""The state schema: every key of a model's state, its shape, dtype, and how it is shared.

A schema is plain data (strings, integers, lists and dicts only, so it is both JSON and bencode
ready) that a session can carry and both ends can check::

    {"version": 1, "buffers": "average",
     "tensors": {"0.weight": {"shape": [10, 64], "dtype": "float32",
                              "kind": "parameter", "share": "mix"}, ...}}

``kind`` is ``parameter`` or ``buffer`` (a persistent buffer of ``model.state_dict()``).
``share`` says how a key travels between nodes, by this rule:

- ``mix``: sent and mixed with the round's weights. Every parameter; every floating buffer
  (BatchNorm's running mean and variance) when the buffer policy is ``average``.
- ``exact``: sent and combined in its own integer dtype, never through the float vector that
  parameters are flattened into, so a counter is never truncated (float32 holds integers exactly
  only up to 2**24). Integer and bool buffers (BatchNorm's int64 ``num_batches_tracked``) when
  the policy is ``average``. The combination is the weighted mean rounded to the nearest integer,
  computed in float64 (exact for magnitudes below 2**53), so nodes whose counters agree keep
  that value exactly.
- ``local``: never sent; each node keeps its own. Every buffer when the policy is ``local``
  (FedBN).

Keys are listed in sorted order, the order :mod:`fedtorrent.state.flat` uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedtorrent.errors import ConfigError, StateError

SCHEMA_VERSION = 1
BUFFER_POLICIES = ("average", "local")
KINDS = ("parameter", "buffer")
SHARES = ("mix", "exact", "local")
MAX_KEYS = 100_000
"""A schema read from outside lists at most this many tensors."""
MAX_KEY_LENGTH = 1024
MAX_DIMS = 16


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype's torch name without ``torch.`` (``float32``, ``int64``): how schemas spell it."""
    return str(dtype).removeprefix("torch.")


DTYPES: dict[str, torch.dtype] = {
    dtype_name(dtype): dtype
    for dtype in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.complex64,
        torch.complex128,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}
"""The dtypes a schema may name, by their torch name without ``torch.``."""


def state_schema(model: nn.Module, *, buffers: str = "average") -> dict[str, Any]:
    """The schema of ``model.state_dict()`` under buffer policy ``buffers`` (see the module doc).

    Raises:
        ConfigError: an unknown policy, a state entry that is not a tensor (extra state), or a
            dtype outside :data:`DTYPES`.
    """
    if buffers not in BUFFER_POLICIES:
        raise ConfigError(f"buffers must be one of {', '.join(BUFFER_POLICIES)}; got {buffers!r}")
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tensors: dict[str, dict[str, Any]] = {}
    state = model.state_dict()
    for key in sorted(state):
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"state entry {key!r} is {type(value).__name__}, not a tensor")
        dtype = dtype_name(value.dtype)
        if dtype not in DTYPES:
            raise ConfigError(f"state tensor {key!r} has dtype {dtype}, which cannot be shared")
        kind = "parameter" if key in parameters else "buffer"
        tensors[key] = {
            "shape": [int(d) for d in value.shape],
            "dtype": dtype,
            "kind": kind,
            "share": _share(kind, value, buffers),
        }
    return {"version": SCHEMA_VERSION, "buffers": buffers, "tensors": tensors}


def shared_keys(schema: Mapping[str, Any]) -> list[str]:
    """The keys that travel between nodes (``share`` is ``mix`` or ``exact``), sorted."""
    return [key for key, entry in schema["tensors"].items() if entry["share"] != "local"]


def validate_schema(schema: object) -> dict[str, Any]:
    """Check a schema from outside (a torrent) for structure and limits; return it as a dict.

    Raises:
        StateError: not a schema of this version: wrong types, unknown names, too many keys or
            dimensions, negative sizes.
    """
    if not isinstance(schema, Mapping):
        raise StateError(f"state schema must be a mapping, got {type(schema).__name__}")
    if set(schema) != {"version", "buffers", "tensors"}:
        raise StateError(f"state schema has fields {sorted(map(str, schema))}, expected "
                         "['buffers', 'tensors', 'version']")  # fmt: skip
    if type(schema["version"]) is not int or schema["version"] != SCHEMA_VERSION:
        raise StateError(f"state schema version {schema['version']!r} is not {SCHEMA_VERSION}")
    if not _is_one_of(schema["buffers"], BUFFER_POLICIES):
        raise StateError(f"state schema buffers {schema['buffers']!r} is not a known policy")
    tensors = schema["tensors"]
    if not isinstance(tensors, Mapping) or len(tensors) > MAX_KEYS:
        raise StateError(f"state schema tensors must be a mapping of at most {MAX_KEYS} keys")
    for key, entry in tensors.items():
        _validate_entry(key, entry)
    return {
        "version": SCHEMA_VERSION,
        "buffers": schema["buffers"],
        "tensors": {
            key: {**tensors[key], "shape": [int(d) for d in tensors[key]["shape"]]}
            for key in sorted(tensors)
        },
    }


def schema_mismatch(schema: Mapping[str, Any], model: nn.Module) -> str | None:
    """The first difference between ``schema`` and ``model``'s state, as one line; None if none.

    Keys are compared in sorted order; for each, presence, then shape, dtype, kind and share.
    ``schema`` is validated first (:func:`validate_schema`).
    """
    expected = validate_schema(schema)
    actual = state_schema(model, buffers=expected["buffers"])["tensors"]
    wanted = expected["tensors"]
    for key in sorted(set(wanted) | set(actual)):
        if key not in actual:
            return f"key {key!r} is in the session's state but not in the model"
        if key not in wanted:
            return f"key {key!r} is in the model but not in the session's state"
        for field in ("shape", "dtype", "kind", "share"):
            if wanted[key][field] != actual[key][field]:
                return (
                    f"key {key!r} has {field} {actual[key][field]} in the model, "
                    f"{wanted[key][field]} in the session"
                )
    return None


def check_schema(schema: Mapping[str, Any], model: nn.Module) -> None:
    """Raise :class:`StateError` naming the first key where ``model`` differs from ``schema``."""
    problem = schema_mismatch(schema, model)
    if problem is not None:
        raise StateError(f"the model does not match the state schema: {problem}")


def _share(kind: str, value: torch.Tensor, buffers: str) -> str:
    if kind == "parameter":
        return "mix"
    if buffers == "local":
        return "local"
    return "mix" if value.is_floating_point() or value.is_complex() else "exact"


def _validate_entry(key: object, entry: object) -> None:
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH:
        raise StateError(f"state schema key must be a string of 1 to {MAX_KEY_LENGTH} characters")
    if not isinstance(entry, Mapping) or set(entry) != {"shape", "dtype", "kind", "share"}:
        raise StateError(f"state schema entry {key!r} needs exactly shape, dtype, kind and share")
    shape = entry["shape"]
    if (
        not isinstance(shape, list | tuple)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise StateError(f"state schema entry {key!r} has a bad shape {shape!r}")
    if not _is_one_of(entry["dtype"], tuple(DTYPES)):
        raise StateError(f"state schema entry {key!r} has an unknown dtype {entry['dtype']!r}")
    if not _is_one_of(entry["kind"], KINDS) or not _is_one_of(entry["share"], SHARES):
        raise StateError(f"state schema entry {key!r} has an unknown kind or share")
    if entry["kind"] == "parameter" and entry["share"] != "mix":
        raise StateError(f"state schema entry {key!r}: a parameter is always shared ('mix')")


def _is_one_of(value: object, names: tuple[str, ...]) -> bool:
    return isinstance(value, str) and value in names
