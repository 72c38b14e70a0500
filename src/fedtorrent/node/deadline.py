"""How long a round's exchange waits for its cohort: a deadline from what the peer measured.

A fixed deadline is either too long (a dead neighbour costs it every time it is dialled) or too
short (a slow but honest neighbour is always stale). A peer therefore keeps the **lags** of its
last rounds: for each state it mixed, the seconds from the moment it published its own state of
the round until that state's fetch ended. A neighbour as fast as this peer answers within a
round trip; a slower one after its extra training time; one still behind at the deadline ends
its fetch at the deadline, so its lag is the deadline itself (a censored sample, which pushes
the next deadline up by the margin). A dead or silent neighbour brings nothing and adds no lag.

The deadline of a round (:meth:`DeadlinePolicy.seconds`) is::

    min(cap, max(floor, margin * quantile(lags), train_s))

over the last ``window`` lags, where ``train_s`` is this peer's own training time of the round
(a neighbour of the same speed that started a little later still makes it), and ``cap`` is
``--exchange-timeout``. Until ``min_samples`` lags are known (the first rounds, and after
``--resume``) the deadline is the cap. In the asynchronous mode (``--staleness``) every member
is fetched once, so its lags are round trips and the deadline only bounds what a dead neighbour
costs. Nothing here touches the network or the clock: the peer passes the numbers in.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from fedtorrent.errors import ConfigError


@dataclass(frozen=True)
class DeadlineSettings:
    """The deadline policy's knobs: ``cap_s`` is ``--exchange-timeout`` (docs/peer.md)."""

    cap_s: float = 10.0
    """The longest a round waits (and the deadline of the first rounds)."""
    adaptive: bool = True
    """False: every round waits ``cap_s`` (``--fixed-deadline``, the behaviour before)."""
    floor_s: float = 1.0
    """The shortest deadline (never above ``cap_s``)."""
    quantile: float = 0.9
    margin: float = 2.0
    window: int = 24
    """Lags remembered (about eight rounds of a cohort of 3)."""
    min_samples: int = 3

    def __post_init__(self) -> None:
        for name in ("cap_s", "floor_s", "margin"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"deadline {name} must be a finite number > 0, got {value}")
        if self.margin < 1:
            raise ConfigError(f"deadline margin must be >= 1, got {self.margin}")
        if not 0 < self.quantile <= 1:
            raise ConfigError(f"deadline quantile must be in (0, 1], got {self.quantile}")
        if not 1 <= self.min_samples <= self.window:
            raise ConfigError("deadline settings need 1 <= min_samples <= window")


def quantile(values: Iterable[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of ``values`` (``q`` in (0, 1]); raises on no values."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("a quantile of no values")
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class DeadlinePolicy:
    """The per-round exchange deadline from recent lags (module docstring)."""

    def __init__(self, settings: DeadlineSettings | None = None) -> None:
        self.settings = settings or DeadlineSettings()
        self._lags: deque[float] = deque(maxlen=self.settings.window)

    @property
    def lags(self) -> tuple[float, ...]:
        """The lags remembered, oldest first (seconds)."""
        return tuple(self._lags)

    def seconds(self, *, train_s: float = 0.0) -> float:
        """This round's deadline in seconds after the peer's publish.

        ``train_s`` is the peer's own training time of the round (without a simulated
        slowdown). The cap while fewer than ``min_samples`` lags are known or when the policy
        is not adaptive.
        """
        s = self.settings
        if not s.adaptive or len(self._lags) < s.min_samples:
            return s.cap_s
        wanted = s.margin * quantile(self._lags, s.quantile)
        if math.isfinite(train_s) and train_s > 0:
            wanted = max(wanted, train_s)
        return min(s.cap_s, max(min(s.floor_s, s.cap_s), wanted))

    def observe(self, lags: Iterable[float]) -> None:
        """Remember a round's lags: seconds from the publish until each mixed state's fetch ended.

        Negative or non-finite values are ignored.
        """
        for lag in lags:
            if math.isfinite(lag) and lag >= 0:
                self._lags.append(float(lag))
