"""Privacy accounting: how much epsilon (at a fixed delta) a peer has spent so far.

The formulas are Opacus's (``opacus.accountants``: RDP, and PRV, which is tighter but slower for
large epsilon); this module only keeps the history of releases and the per-round epsilons.

One *release* is one Gaussian mechanism applied with a ``noise_multiplier`` on data sampled at
``sample_rate``. Update-level DP is one release per round at ``sample_rate=1`` (the whole local
dataset shapes the update); DP-SGD is one release per local optimizer step at the local Poisson
sampling rate. Opacus is imported on first use so that ``import fedtorrent`` stays fast.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from fedtorrent.config import DP_ACCOUNTANTS, PrivacyConfig
from fedtorrent.errors import PrivacyError, UnknownNameError

Release = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, steps)``: Opacus's history entry."""


class PrivacyAccountant:
    """Composes one peer's releases round after round and reports epsilon at ``delta``.

    Record releases with :meth:`record` (or the ``optimizer_hook`` for DP-SGD), close each round
    with :meth:`end_round`, which returns the epsilon spent so far; :meth:`record_round` does both
    for update-level DP. ``epsilons[r]`` is the total spent after round ``r`` (0-based).
    """

    def __init__(self, *, delta: float, mechanism: str = "rdp") -> None:
        if mechanism not in DP_ACCOUNTANTS:
            raise UnknownNameError("accountant", mechanism, DP_ACCOUNTANTS)
        if not 0 < delta < 1:
            raise PrivacyError(f"delta must be in (0, 1), got {delta}")
        self.delta = delta
        self.mechanism = mechanism
        self.epsilons: list[float] = []
        self._opacus: Any = None
        self._history: list[Release] = []

    @property
    def rounds(self) -> int:
        """Rounds closed so far."""
        return len(self.epsilons)

    @property
    def history(self) -> list[Release]:
        """Every release so far, run-length encoded as Opacus keeps it."""
        return list(self._history)

    @property
    def opacus_accountant(self) -> Any:
        """The Opacus accountant holding the same history (DP-SGD's optimizer hook steps it)."""
        if self._opacus is None:
            from opacus.accountants import create_accountant  # noqa: PLC0415 (slow import)

            self._opacus = create_accountant(mechanism=self.mechanism)
            self._opacus.history = self._history  # one list, shared on purpose
        return self._opacus

    def record(self, *, noise_multiplier: float, sample_rate: float = 1.0, steps: int = 1) -> None:
        """Add ``steps`` releases of the Gaussian mechanism to the current round."""
        _check_release(noise_multiplier, sample_rate, steps)
        accountant = self.opacus_accountant
        for _ in range(steps):
            accountant.step(noise_multiplier=float(noise_multiplier), sample_rate=sample_rate)

    def end_round(self) -> float:
        """Close the current round; returns (and keeps) the epsilon spent so far."""
        epsilon = self.epsilon()
        self.epsilons.append(epsilon)
        return epsilon

    def record_round(
        self, *, noise_multiplier: float, sample_rate: float = 1.0, steps: int = 1
    ) -> float:
        """Record one round's releases and close it; returns the epsilon spent so far."""
        self.record(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return self.end_round()

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent by every release so far, at ``delta`` (default: the accountant's).

        Returns 0.0 before any release. Raises PrivacyError where Opacus cannot bound it.
        """
        if not self._history:
            return 0.0
        return _epsilon(self.mechanism, self._history, self.delta if delta is None else delta)

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON/msgpack-ready state: mechanism, delta, history and per-round epsilons."""
        return {
            "mechanism": self.mechanism,
            "delta": self.delta,
            "history": [list(release) for release in self._history],
            "epsilons": list(self.epsilons),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; checks every field, since it may come from a file.

        Raises:
            PrivacyError: another mechanism, or a malformed field.
        """
        if state.get("mechanism") != self.mechanism:
            raise PrivacyError(
                f"state is for accountant {state.get('mechanism')!r}, not {self.mechanism!r}"
            )
        delta, history, epsilons = state.get("delta"), state.get("history"), state.get("epsilons")
        if not (isinstance(delta, float) and 0 < delta < 1):
            raise PrivacyError(f"accountant state has a bad delta: {delta!r}")
        if not isinstance(history, list) or not isinstance(epsilons, list):
            raise PrivacyError("accountant state needs lists 'history' and 'epsilons'")
        releases: list[Release] = []
        for entry in history:
            if not (isinstance(entry, list | tuple) and len(entry) == 3):
                raise PrivacyError(f"accountant history entry {entry!r} is not a triple")
            noise, rate, steps = entry
            _check_release(noise, rate, steps)
            releases.append((float(noise), float(rate), int(steps)))
        if not all(isinstance(e, float) and e >= 0 for e in epsilons):
            raise PrivacyError("accountant epsilons must be floats >= 0")
        self.delta = delta
        self._history[:] = releases  # in place: the Opacus accountant shares this list
        self.epsilons = list(epsilons)


MAX_NOISE = 1e6
"""The search gives up past this noise multiplier (Opacus's ``MAX_SIGMA``)."""


def noise_for_epsilon(
    target_epsilon: float,
    delta: float,
    rounds: int,
    *,
    sample_rate: float = 1.0,
    steps_per_round: int = 1,
    mechanism: str = "rdp",
    epsilon_tolerance: float = 0.01,
    extra: Sequence[Release] = (),
) -> float:
    """The smallest noise multiplier (to ``epsilon_tolerance``) that stays within the budget.

    After ``rounds`` rounds of ``steps_per_round`` releases at ``sample_rate``, plus the
    releases ``extra`` of the whole run (fixed; e.g. a private trust fit's, every round's
    together), epsilon at ``delta`` is at most ``target_epsilon``: ``target - tolerance <
    epsilon <= target``. The search is Opacus's ``get_noise_multiplier`` (double the noise from
    20 until within the target, then bisect), over the combined history; without ``extra`` it
    returns what Opacus's does.

    Raises:
        PrivacyError: the budget cannot be met with any reasonable noise (or ``extra`` alone
            spends it).
    """
    if mechanism not in DP_ACCOUNTANTS:
        raise UnknownNameError("accountant", mechanism, DP_ACCOUNTANTS)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyError(f"target epsilon must be a finite number > 0, got {target_epsilon}")
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    if rounds < 1 or steps_per_round < 1:
        raise PrivacyError(
            f"rounds and steps_per_round must be >= 1, got {rounds}, {steps_per_round}"
        )
    _check_release(1.0, sample_rate, 1)
    fixed = [(float(n), float(q), int(k)) for n, q, k in extra]
    for release in fixed:
        _check_release(*release)
    if fixed and (spent := _epsilon(mechanism, fixed, delta)) >= target_epsilon:
        raise PrivacyError(
            f"cannot reach epsilon {target_epsilon} at delta {delta}: the other releases "
            f"({fixed}) alone spend {spent:.4g}"
        )
    steps = rounds * steps_per_round

    def epsilon_at(noise: float) -> float:
        return _epsilon(mechanism, [(noise, sample_rate, steps), *fixed], delta)

    low, high, at_high = 0.0, 10.0, math.inf
    while at_high > target_epsilon:
        high *= 2
        at_high = epsilon_at(high)
        if high > MAX_NOISE:
            raise PrivacyError(
                f"cannot reach epsilon {target_epsilon} at delta {delta}: the privacy budget "
                "is too low"
            )
    while target_epsilon - at_high > epsilon_tolerance:
        middle = (low + high) / 2
        at_middle = epsilon_at(middle)
        if at_middle < target_epsilon:
            high, at_high = middle, at_middle
        else:
            low = middle
    return high


def resolve_noise_multiplier(
    config: PrivacyConfig,
    rounds: int,
    *,
    sample_rate: float = 1.0,
    steps_per_round: int = 1,
    extra_per_round: Sequence[Release] = (),
) -> float:
    """The noise multiplier a run uses: the configured one, or one derived from the target.

    With a target, ``extra_per_round`` (releases every round makes besides these, e.g. a
    private trust fit's) counts towards it too, ``rounds`` times (:func:`noise_for_epsilon`).

    Raises:
        PrivacyError: privacy is off in ``config``, or the target cannot be met.
    """
    if not config.enabled:
        raise PrivacyError("differential privacy is off: no dp clip norm is set")
    if config.noise_multiplier is not None:
        return config.noise_multiplier
    assert config.target_epsilon is not None  # PrivacyConfig guarantees one of the two
    return noise_for_epsilon(
        config.target_epsilon,
        config.delta,
        rounds,
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        mechanism=config.accountant,
        extra=[(noise, rate, steps * rounds) for noise, rate, steps in extra_per_round],
    )


def _epsilon(mechanism: str, history: list[Release], delta: float) -> float:
    """Epsilon from a fresh Opacus accountant over ``history``, with its warnings silenced.

    Releases of the same noise and rate are merged wherever they occur (composition does not
    depend on the order; Opacus merges only neighbours), so a history alternating training and
    trust steps costs two entries, not two per round.
    """
    from opacus.accountants import create_accountant  # noqa: PLC0415 (slow import)

    merged: dict[tuple[float, float], int] = {}
    for noise, rate, steps in history:
        merged[noise, rate] = merged.get((noise, rate), 0) + steps
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = [(noise, rate, steps) for (noise, rate), steps in merged.items()]
    try:
        with _quiet():
            epsilon = float(accountant.get_epsilon(delta=delta))
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise PrivacyError(f"the {mechanism} accountant cannot bound epsilon: {exc}") from exc
    if math.isnan(epsilon):
        raise PrivacyError(f"the {mechanism} accountant returned NaN for {history}")
    return epsilon


def _check_release(noise_multiplier: object, sample_rate: object, steps: object) -> None:
    if not (
        isinstance(noise_multiplier, int | float)
        and math.isfinite(noise_multiplier)
        and noise_multiplier > 0
    ):
        raise PrivacyError(
            f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}"
        )
    if not (isinstance(sample_rate, int | float) and 0 < sample_rate <= 1):
        raise PrivacyError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise PrivacyError(f"steps must be an int >= 1, got {steps!r}")


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence Opacus's numeric warnings (log(0) at sample_rate=1; "optimal order is largest")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield
