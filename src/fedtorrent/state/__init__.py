"""Model state as bytes (safetensors) and as one flat vector in a fixed key order."""

from fedtorrent.state.codec import decode_state, encode_state, state_digest
from fedtorrent.state.flat import flatten, unflatten

__all__ = ["decode_state", "encode_state", "flatten", "state_digest", "unflatten"]
