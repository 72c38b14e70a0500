"""Poisoning attacks a malicious peer can mount: pure functions for the simulator and the peer.

An attack changes either what a peer *shares* (its parameters, on flat vectors ``(..., P)``, so the
simulator can attack K stacked rows at once and a peer its one flattened state) or what it *trains
on* (``label_flip``, a data transform). Its own row in its own mix stays the truth, as for any peer.

With ``theta`` the attacker's trained parameters this round, ``ref`` what it held before training
(after it last mixed), ``theta0`` the session's initial parameters and ``s`` the attack's scale:

| kind | shared vector | default ``s`` |
|---|---|---|
| ``noise`` | ``N(0, s^2)`` in every coordinate: random parameters | 1.0 |
| ``sign_flip`` | ``ref - s * (theta - ref)``: the round's update, reversed and magnified | 4.0 |
| ``scale`` | ``ref + s * (theta - ref)``: the round's update, magnified | 20.0 |
| ``label_flip`` | ``theta``, trained on labels ``C - 1 - y`` | (none) |
| ``free_rider`` | ``theta0``: contributes nothing, gets the swarm's model | (none) |
| ``nan`` | NaN everywhere: the decoder rejects it (the simulator drops and counts it) | (none) |
| ``extreme`` | ``s`` in every coordinate: finite, so it passes the decoder | 1e10 |
| ``extreme_mixed`` | ``+s`` or ``-s`` per coordinate, the sign drawn at random (seeded) | 1e10 |

The two ``extreme`` attacks take any finite float32 scale (up to ``3.4e38``); they are what the
plausibility screen (``mixing.screen``) and the numerically safe trust objective are for. A
constant vector is the nastier of the two for learned trust: for a linear model it shifts every
class's logit alike, so the validation loss barely sees it while its magnitude wipes out the
honest part of any mix in float32.

With ``fixed`` averaging over M members, K sign-flippers move an honest node by about
``((M - K) - K s) / M`` times an honest update: at ``s = 4``, 2 of 6 move it backwards (the model
unlearns), which is why 4 is the default.
"""

from __future__ import annotations

__all__ = ["ATTACKS", "AttackConfig", "attack_params", "attacker_nodes", "flip_labels"]

import math
from dataclasses import dataclass

import torch

from fedtorrent.config import ATTACKS
from fedtorrent.errors import ConfigError, UnknownNameError

Tensor = torch.Tensor
DEFAULT_SCALE = {
    "noise": 1.0,
    "sign_flip": 4.0,
    "scale": 20.0,
    "extreme": 1e10,
    "extreme_mixed": 1e10,
}
"""Scale used when none is given; the other attacks take none."""
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
"""The largest scale an ``extreme`` attack takes: its values stay finite in float32."""


@dataclass(frozen=True)
class AttackConfig:
    """One attack: its ``kind`` (:data:`ATTACKS`), ``scale`` where it takes one, first round.

    ``start`` (``--attack-from``): the attacker shares what an honest peer would in rounds
    ``0 .. start - 1`` (0-based; a peer's round ``r`` is ``r - 1`` here) and attacks from round
    ``start`` on: the delayed attacker, which learned trust must first come to trust and then
    exclude. ``label_flip`` takes no ``start``: its poison is the training data, from the start.
    """

    kind: str
    scale: float | None = None
    start: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise UnknownNameError("attack", self.kind, ATTACKS)
        if self.start < 0:
            raise ConfigError(f"an attack's first round must be >= 0, got {self.start}")
        if self.start > 0 and self.kind == "label_flip":
            raise ConfigError("label_flip poisons the training data from the start: no attack-from")
        if self.scale is not None:
            if self.kind not in DEFAULT_SCALE:
                raise ConfigError(f"attack {self.kind!r} takes no scale")
            if not (math.isfinite(self.scale) and self.scale > 0):
                raise ConfigError(f"attack scale must be a finite number > 0, got {self.scale}")
            if self.kind.startswith("extreme") and self.scale > FLOAT32_MAX:
                raise ConfigError(
                    f"attack {self.kind!r} takes a scale up to {FLOAT32_MAX:.6g} (finite in "
                    f"float32), got {self.scale}"
                )

    @property
    def strength(self) -> float:
        """The scale in use (the default where none was given; 0 for attacks without one)."""
        if self.scale is not None:
            return self.scale
        return DEFAULT_SCALE.get(self.kind, 0.0)

    def active(self, round_index: int) -> bool:
        """Whether the attack is mounted in ``round_index`` (0-based)."""
        return round_index >= self.start

    @property
    def poisons_data(self) -> bool:
        """True when the attack changes the training data rather than what is shared."""
        return self.kind == "label_flip"


def attack_params(
    config: AttackConfig,
    params: Tensor,
    *,
    reference: Tensor,
    initial: Tensor,
    generator: torch.Generator,
) -> Tensor:
    """What an attacker shares instead of ``params``; see the module table.

    Args:
        config: the attack.
        params: ``(..., P)`` trained parameters (one row per attacker).
        reference: same shape: what each attacker held before this round's training.
        initial: ``(P,)`` or same shape: the session's initial parameters.
        generator: draws the ``noise`` attack's values and ``extreme_mixed``'s signs (CPU).

    Returns:
        A new tensor shaped like ``params`` (``params`` itself is never modified).
    """
    if reference.shape != params.shape:
        raise ConfigError(
            f"reference {tuple(reference.shape)} and params {tuple(params.shape)} differ in shape"
        )
    kind, s = config.kind, config.strength
    if kind == "noise":
        draw = torch.randn(params.shape, generator=generator, dtype=torch.float32) * s
        return draw.to(params.dtype)
    if kind == "sign_flip":
        return reference - s * (params - reference)
    if kind == "scale":
        return reference + s * (params - reference)
    if kind == "free_rider":
        return initial.expand_as(params).clone()
    if kind == "nan":
        return torch.full_like(params, math.nan)
    if kind == "extreme":
        return torch.full_like(params, s)
    if kind == "extreme_mixed":
        signs = torch.randint(0, 2, params.shape, generator=generator, dtype=torch.int8)
        return (signs.to(params.dtype) * 2 - 1) * s
    return params.clone()  # label_flip: the poison is in the training data


def flip_labels(labels: Tensor, num_classes: int) -> Tensor:
    """``label_flip``'s data transform: class ``y`` becomes ``num_classes - 1 - y``."""
    if num_classes < 2:
        raise ConfigError(f"flipping labels needs >= 2 classes, got {num_classes}")
    return (num_classes - 1) - labels


def attacker_nodes(num_nodes: int, attackers: int) -> list[int]:
    """Which nodes attack: the last ``attackers`` of ``num_nodes`` (so node 0 is always honest)."""
    if not 0 <= attackers < num_nodes:
        raise ConfigError(
            f"attackers must be in [0, {num_nodes}) so one node stays honest, got {attackers}"
        )
    return list(range(num_nodes - attackers, num_nodes))
