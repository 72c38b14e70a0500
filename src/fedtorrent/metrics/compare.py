"""Comparing two sharing rules seed by seed.

Runs of two rules on the same seed share the split, the initial model and the batches, so their
difference is far less noisy than either accuracy: a paired comparison tells apart differences
that the spread across seeds hides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import mean, stdev
from typing import Any

from fedtorrent.errors import ConfigError

_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093,
        24: 2.064, 29: 2.045, 39: 2.023, 59: 2.001, 119: 1.980}  # fmt: skip
"""Two-sided 95% quantiles of Student's t by degrees of freedom (a table: no scipy for this)."""


def t95(dof: int) -> float:
    """The quantile for ``dof`` degrees of freedom, rounded towards fewer (a wider interval)."""
    if dof < 1:
        raise ConfigError(f"a t interval needs at least 1 degree of freedom, got {dof}")
    return _T95[max(d for d in _T95 if d <= dof)]


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Mean of ``a - b`` pair by pair, its 95% t interval, and how many pairs favour ``a``.

    Raises:
        ConfigError: fewer than two pairs, or sequences of different lengths.
    """
    if len(a) != len(b) or len(a) < 2:
        raise ConfigError(f"need two equal sequences of at least 2 values, got {len(a)}, {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    centre = mean(diffs)
    half = t95(len(diffs) - 1) * stdev(diffs) / math.sqrt(len(diffs))
    return {
        "mean": centre,
        "low": centre - half,
        "high": centre + half,
        "wins": sum(d > 0 for d in diffs),
        "ties": sum(d == 0 for d in diffs),
        "diffs": diffs,
    }
