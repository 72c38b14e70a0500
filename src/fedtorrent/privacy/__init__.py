"""Differential privacy: the Gaussian mechanism on shared updates, DP-SGD, the accountant."""

from fedtorrent.privacy.accountant import (
    PrivacyAccountant,
    noise_for_epsilon,
    resolve_noise_multiplier,
)
from fedtorrent.privacy.dp_sgd import ExampleDP, ExamplePrivacy, example_dp
from fedtorrent.privacy.mechanism import (
    add_gaussian_noise,
    clip_update,
    l2_norm,
    privatize,
    privatize_rows,
    privatize_state,
)

__all__ = [
    "ExampleDP",
    "ExamplePrivacy",
    "PrivacyAccountant",
    "add_gaussian_noise",
    "clip_update",
    "example_dp",
    "l2_norm",
    "noise_for_epsilon",
    "privatize",
    "privatize_rows",
    "privatize_state",
    "resolve_noise_multiplier",
]
