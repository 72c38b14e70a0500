"""Paired comparisons of two rules seed by seed."""

from __future__ import annotations

import pytest

from fedtorrent.errors import ConfigError
from fedtorrent.metrics.compare import paired_difference, t95


def test_paired_difference_by_hand() -> None:
    # diffs 1, 2, 3: mean 2, sample std 1, half width t(2) / sqrt(3) = 4.303 / 1.732
    pair = paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert pair["mean"] == pytest.approx(2.0)
    assert pair["high"] - pair["mean"] == pytest.approx(4.303 / 3**0.5)
    assert pair["low"] < 0 < pair["high"]  # three seeds cannot tell even this apart from zero
    assert pair["wins"] == 3 and pair["ties"] == 0


def test_a_steady_difference_is_told_apart_from_zero() -> None:
    a = [84.4 + 0.01 * (i % 3) for i in range(12)]
    b = [v - 0.05 for v in a[:6]] + [v - 0.06 for v in a[6:]]
    pair = paired_difference(a, b)
    assert pair["low"] > 0 and pair["wins"] == 12


def test_t_quantiles_round_towards_wider_intervals() -> None:
    assert t95(1) == pytest.approx(12.706)
    assert t95(16) == t95(15) > t95(19)
    with pytest.raises(ConfigError):
        t95(0)


@pytest.mark.parametrize(("a", "b"), [([1.0], [1.0]), ([1.0, 2.0], [1.0])])
def test_bad_input_is_a_config_error(a: list[float], b: list[float]) -> None:
    with pytest.raises(ConfigError):
        paired_difference(a, b)
