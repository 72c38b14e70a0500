"""The adaptive exchange deadline (``node.deadline``): pure numbers in, seconds out."""

from __future__ import annotations

import pytest

from fedtorrent.errors import ConfigError
from fedtorrent.node.deadline import DeadlinePolicy, DeadlineSettings, quantile


def test_the_first_rounds_wait_the_cap_then_the_deadline_follows_the_lags() -> None:
    policy = DeadlinePolicy(DeadlineSettings(cap_s=10.0))
    assert policy.seconds() == 10.0  # nothing measured
    policy.observe([0.5, 0.6])
    assert policy.seconds() == 10.0  # fewer than min_samples
    policy.observe([0.7])
    assert policy.seconds() == pytest.approx(2 * 0.7)  # margin x the 0.9 quantile
    policy.observe([0.01] * 20)
    assert policy.seconds() == 1.0  # fast neighbours: the floor
    assert policy.seconds(train_s=3.0) == 3.0  # never below this peer's own training time
    policy.observe([30.0] * 24)
    assert policy.seconds() == 10.0  # never above the cap


def test_late_neighbours_push_the_deadline_up_until_they_make_it() -> None:
    """A neighbour behind at the deadline ends its fetch then: its lag is the deadline."""
    policy = DeadlinePolicy(DeadlineSettings(cap_s=20.0, window=6))
    policy.observe([0.2] * 6)
    seen = [policy.seconds()]
    for _ in range(3):  # one slow neighbour needs 3 s; each round it is late the deadline grows
        deadline = policy.seconds()
        policy.observe([0.2, 0.2, min(3.0, deadline)])
        seen.append(policy.seconds())
    assert seen == [1.0, 2.0, 4.0, 6.0]  # then 2 x its true lag, 3 s: it makes it


def test_a_window_forgets_old_lags_and_bad_values_are_ignored() -> None:
    policy = DeadlinePolicy(DeadlineSettings(window=4, min_samples=2))
    policy.observe([9.0, 9.0, float("nan"), -1.0, float("inf")])
    assert policy.lags == (9.0, 9.0)
    policy.observe([0.1] * 4)
    assert policy.lags == (0.1,) * 4 and policy.seconds() == 1.0


def test_a_fixed_deadline_is_the_cap_and_the_floor_never_exceeds_it() -> None:
    fixed = DeadlinePolicy(DeadlineSettings(cap_s=4.0, adaptive=False))
    fixed.observe([0.1] * 10)
    assert fixed.seconds() == 4.0
    short = DeadlinePolicy(DeadlineSettings(cap_s=0.3))
    short.observe([0.01] * 5)
    assert short.seconds() == 0.3


def test_quantile_and_settings_checks() -> None:
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.9) == 4.0
    assert quantile([5.0], 0.1) == 5.0
    with pytest.raises(ValueError, match="no values"):
        quantile([], 0.5)
    for bad in (
        {"cap_s": 0.0}, {"floor_s": float("nan")}, {"margin": 0.5}, {"quantile": 0.0},
        {"quantile": 1.5}, {"min_samples": 0}, {"window": 2, "min_samples": 3},
    ):  # fmt: skip
        with pytest.raises(ConfigError):
            DeadlineSettings(**bad)  # type: ignore[arg-type]
