"""The Gaussian mechanism on a shared update: clip to an L2 norm, then add seeded noise.

Pure functions. An update is either one tensor (any shape, e.g. a flat parameter vector) or a
state delta (key -> tensor); its norm is taken over all of its floating-point values together.
Integer tensors in a state delta (counters such as BatchNorm's ``num_batches_tracked``) carry no
gradient signal and pass through untouched.

Only the output of :func:`privatize` may leave a peer: the clip bounds how much one peer's data can
move the update (the sensitivity), the noise of std ``noise_multiplier * clip`` hides it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import overload

import torch

from fedtorrent.errors import PrivacyError

_CLIP_MARGIN = 1 - 1e-6
"""Clip a hair below ``clip`` so float32 rounding of the scaled values can never overshoot it."""


def l2_norm(update: torch.Tensor | Mapping[str, torch.Tensor]) -> float:
    """L2 norm over every floating-point value of the update (computed in float64)."""
    tensors = [update] if isinstance(update, torch.Tensor) else list(update.values())
    total = 0.0
    for tensor in tensors:
        if tensor.is_floating_point():
            total += float(tensor.detach().to(torch.float64).square().sum())
    return math.sqrt(total)


@overload
def clip_update(update: torch.Tensor, clip: float) -> torch.Tensor: ...
@overload
def clip_update(update: Mapping[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]: ...
def clip_update(
    update: torch.Tensor | Mapping[str, torch.Tensor], clip: float
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Scale the update down so its L2 norm is at most ``clip``; smaller updates come back as is.

    Returns new tensors; the input is never modified. The bound is exact for float32 values
    (a margin of 1e-6 absorbs rounding); half-precision tensors may overshoot by their rounding.

    Raises:
        PrivacyError: ``clip`` is not a finite positive number, or the update is not finite.
    """
    _check_positive("clip", clip)
    norm = l2_norm(update)
    if not math.isfinite(norm):
        raise PrivacyError("cannot clip an update holding NaN or infinite values")
    if norm <= clip:
        return _map_float(update, torch.Tensor.clone)
    scale = clip / norm * _CLIP_MARGIN
    return _map_float(update, lambda t: t * scale)


@overload
def add_gaussian_noise(
    update: torch.Tensor, std: float, *, generator: torch.Generator
) -> torch.Tensor: ...
@overload
def add_gaussian_noise(
    update: Mapping[str, torch.Tensor], std: float, *, generator: torch.Generator
) -> dict[str, torch.Tensor]: ...
def add_gaussian_noise(
    update: torch.Tensor | Mapping[str, torch.Tensor], std: float, *, generator: torch.Generator
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Add i.i.d. N(0, std^2) noise to every floating-point value, drawn from ``generator``.

    Noise is drawn on the CPU in sorted key order, so one seed gives the same noise everywhere.

    Raises:
        PrivacyError: ``std`` is negative or not finite.
    """
    if not (math.isfinite(std) and std >= 0):
        raise PrivacyError(f"noise std must be a finite number >= 0, got {std}")

    def noised(tensor: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * std
        return (tensor.detach().to(torch.float64) + noise.to(tensor.device)).to(tensor.dtype)

    return _map_float(update, noised)


@overload
def privatize(
    update: torch.Tensor, *, clip: float, noise_multiplier: float, generator: torch.Generator
) -> torch.Tensor: ...
@overload
def privatize(
    update: Mapping[str, torch.Tensor],
    *,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]: ...
def privatize(
    update: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Clip to L2 norm ``clip``, then add Gaussian noise of std ``noise_multiplier * clip``.

    Call it once per round and send the same result to every receiver: each extra draw on the
    same data is another release the accountant would have to count.
    """
    _check_positive("noise_multiplier", noise_multiplier)
    clipped = clip_update(update, clip)
    return add_gaussian_noise(clipped, noise_multiplier * clip, generator=generator)


def privatize_state(
    state: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    *,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The state to share: ``reference + privatize(state - reference)``.

    ``reference`` is what the peer held after it last mixed (already public), so only the noised
    change since then depends on this round's local training. Integer tensors come from ``state``.

    Raises:
        PrivacyError: the two states have different keys or shapes.
    """
    if set(state) != set(reference):
        raise PrivacyError("state and reference hold different keys")
    delta: dict[str, torch.Tensor] = {}
    for key in sorted(state):
        now, ref = state[key], reference[key]
        if now.shape != ref.shape:
            raise PrivacyError(f"state and reference differ in shape at {key!r}")
        delta[key] = now - ref if now.is_floating_point() else now
    noised = privatize(delta, clip=clip, noise_multiplier=noise_multiplier, generator=generator)
    return {
        key: (reference[key] + value).to(reference[key].dtype)
        if value.is_floating_point()
        else value.clone()
        for key, value in noised.items()
    }


def privatize_rows(
    updates: torch.Tensor,
    *,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Clip each row of a stacked ``[peers, params]`` matrix on its own, then noise all of it.

    The vectorized simulator's form of :func:`privatize`: row ``i`` is peer ``i``'s flat update.

    Raises:
        PrivacyError: ``updates`` is not a 2-D floating-point matrix of finite values.
    """
    _check_positive("clip", clip)
    _check_positive("noise_multiplier", noise_multiplier)
    if updates.ndim != 2 or not updates.is_floating_point():
        raise PrivacyError(f"updates must be a 2-D float matrix, got {tuple(updates.shape)}")
    norms = updates.detach().to(torch.float64).norm(dim=1, keepdim=True)
    if not bool(torch.isfinite(norms).all()):
        raise PrivacyError("cannot clip updates holding NaN or infinite values")
    scale = torch.where(norms > clip, clip / norms * _CLIP_MARGIN, 1.0).to(updates.dtype)
    clipped: torch.Tensor = updates.detach() * scale
    return add_gaussian_noise(clipped, noise_multiplier * clip, generator=generator)


def _map_float(
    update: torch.Tensor | Mapping[str, torch.Tensor],
    fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Apply ``fn`` to each floating-point tensor, in sorted key order; copy the others."""
    if isinstance(update, torch.Tensor):
        if not update.is_floating_point():
            raise PrivacyError(f"an update tensor must be floating point, not {update.dtype}")
        return fn(update.detach())
    return {
        key: fn(update[key].detach()) if update[key].is_floating_point() else update[key].clone()
        for key in sorted(update)
    }


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise PrivacyError(f"{name} must be a finite number > 0, got {value!r}")
