"""One fixed key order (sorted) for turning a state dict into a vector and back."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedtorrent.errors import StateError


def flatten(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate float tensors in sorted key order into one 1-D float32 vector."""
    return torch.cat([state[k].detach().reshape(-1).to(torch.float32) for k in sorted(state)])


def unflatten(vector: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split ``vector`` back into tensors shaped and typed like ``like``."""
    sizes = [like[k].numel() for k in sorted(like)]
    if vector.ndim != 1 or vector.numel() != sum(sizes):
        raise StateError(f"vector of shape {tuple(vector.shape)} does not hold {sum(sizes)} values")
    out: dict[str, torch.Tensor] = {}
    for key, chunk in zip(sorted(like), torch.split(vector, sizes), strict=True):
        out[key] = chunk.reshape(like[key].shape).to(like[key].dtype).clone()
    return out
