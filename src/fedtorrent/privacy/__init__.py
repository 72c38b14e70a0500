"""Differential privacy on what a peer shares: the Gaussian mechanism and its accountant."""

from fedtorrent.privacy.accountant import (
    PrivacyAccountant,
    noise_for_epsilon,
    resolve_noise_multiplier,
)
from fedtorrent.privacy.dp_sgd import DPSGD, make_dp_sgd
from fedtorrent.privacy.mechanism import (
    add_gaussian_noise,
    clip_update,
    l2_norm,
    privatize,
    privatize_rows,
    privatize_state,
)

__all__ = [
    "DPSGD",
    "PrivacyAccountant",
    "add_gaussian_noise",
    "clip_update",
    "l2_norm",
    "make_dp_sgd",
    "noise_for_epsilon",
    "privatize",
    "privatize_rows",
    "privatize_state",
    "resolve_noise_multiplier",
]
