"""Differential privacy: the Gaussian mechanism, the accountant, DP-SGD, and PrivacyConfig."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtorrent.config import PrivacyConfig
from fedtorrent.errors import ConfigError, PrivacyError, UnknownNameError
from fedtorrent.privacy import (
    PrivacyAccountant,
    add_gaussian_noise,
    clip_update,
    l2_norm,
    noise_for_epsilon,
    privatize,
    privatize_rows,
    privatize_state,
    resolve_noise_multiplier,
)

DELTA = 1e-5
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
clips = st.floats(min_value=1e-3, max_value=1e3)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- mechanism ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=64), clip=clips)
def test_clipped_flat_update_never_exceeds_the_clip(values: list[float], clip: float) -> None:
    update = torch.tensor(values, dtype=torch.float32)
    clipped = clip_update(update, clip)
    assert l2_norm(clipped) <= clip
    if l2_norm(update) <= clip:
        assert torch.equal(clipped, update)
    else:  # direction kept, length just under the clip
        assert l2_norm(clipped) == pytest.approx(clip, rel=1e-5)
        assert torch.allclose(clipped * (l2_norm(update) / l2_norm(clipped)), update, rtol=1e-4)


@settings(max_examples=100, deadline=None)
@given(
    first=st.lists(finite, min_size=1, max_size=16),
    second=st.lists(finite, min_size=1, max_size=16),
    clip=clips,
)
def test_clipped_state_delta_bound_spans_all_tensors(
    first: list[float], second: list[float], clip: float
) -> None:
    delta = {
        "b": torch.tensor(first),
        "a": torch.tensor(second).reshape(-1, 1),
        "steps": torch.tensor([7]),
    }
    clipped = clip_update(delta, clip)
    assert l2_norm(clipped) <= clip
    assert clipped["a"].shape == delta["a"].shape
    assert torch.equal(clipped["steps"], delta["steps"])  # integer counters pass through


def test_clip_refuses_non_finite_updates_and_bad_clips() -> None:
    with pytest.raises(PrivacyError):
        clip_update(torch.tensor([1.0, float("nan")]), 1.0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(PrivacyError):
            clip_update(torch.ones(3), bad)
    with pytest.raises(PrivacyError):
        clip_update(torch.ones(3, dtype=torch.int64), 1.0)


def test_noise_std_is_sigma_times_clip_and_seeded() -> None:
    clip, sigma, n = 2.0, 0.75, 40_000
    noised = privatize(torch.zeros(n), clip=clip, noise_multiplier=sigma, generator=gen(1))
    # The sample std of n normals is within 3 standard errors (std / sqrt(2n)) of the truth.
    expected = sigma * clip
    assert abs(float(noised.std()) - expected) < 3 * expected / math.sqrt(2 * n)
    assert abs(float(noised.mean())) < 3 * expected / math.sqrt(n)
    again = privatize(torch.zeros(n), clip=clip, noise_multiplier=sigma, generator=gen(1))
    other = privatize(torch.zeros(n), clip=clip, noise_multiplier=sigma, generator=gen(2))
    assert torch.equal(noised, again)
    assert not torch.equal(noised, other)


def test_noise_is_added_to_the_clipped_update() -> None:
    update = torch.full((10_000,), 3.0)  # norm 300, clipped to 1
    noised = privatize(update, clip=1.0, noise_multiplier=1e-3, generator=gen())
    assert float(noised.mean()) == pytest.approx(0.01, rel=1e-2)
    assert add_gaussian_noise(update, 0.0, generator=gen()).equal(update)
    with pytest.raises(PrivacyError):
        add_gaussian_noise(update, -1.0, generator=gen())


def test_privatize_state_shares_reference_plus_noised_change() -> None:
    reference = {"w": torch.zeros(4, 3), "count": torch.tensor(5)}
    state = {"w": torch.full((4, 3), 10.0), "count": torch.tensor(9)}
    shared = privatize_state(state, reference, clip=1.0, noise_multiplier=1e-6, generator=gen())
    change = shared["w"] - reference["w"]
    assert l2_norm(change) == pytest.approx(1.0, rel=1e-4)
    assert torch.allclose(change, torch.full((4, 3), 1 / math.sqrt(12)), atol=1e-4)
    assert int(shared["count"]) == 9 and shared["w"].dtype == torch.float32
    with pytest.raises(PrivacyError):
        privatize_state(
            {"w": torch.zeros(2)}, reference, clip=1.0, noise_multiplier=1.0, generator=gen()
        )


def test_privatize_rows_clips_each_peer_on_its_own() -> None:
    updates = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    out = privatize_rows(updates, clip=1.0, noise_multiplier=1e-9, generator=gen())
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]), atol=1e-5)
    assert float(out.norm(dim=1).max()) <= 1.0
    with pytest.raises(PrivacyError):
        privatize_rows(torch.ones(3), clip=1.0, noise_multiplier=1.0, generator=gen())


# --- accountant ----------------------------------------------------------------------------------


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a mu-GDP Gaussian mechanism (Balle & Wang 2018), by bisection."""

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def delta_of(eps: float) -> float:
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)

    low, high = 0.0, 500.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_of(mid) > delta else (low, mid)
    return high


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_epsilon_grows_with_rounds_and_falls_with_noise(mechanism: str) -> None:
    low_noise = PrivacyAccountant(delta=DELTA, mechanism=mechanism)
    high_noise = PrivacyAccountant(delta=DELTA, mechanism=mechanism)
    assert low_noise.epsilon() == 0.0
    for _ in range(4):
        low_noise.record_round(noise_multiplier=2.0)
        high_noise.record_round(noise_multiplier=4.0)
    assert low_noise.rounds == 4
    assert all(a < b for a, b in zip(low_noise.epsilons, low_noise.epsilons[1:], strict=False))
    assert all(h < lo for h, lo in zip(high_noise.epsilons, low_noise.epsilons, strict=True))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # Opacus PRV at sample_rate=1
def test_epsilon_matches_opacus_called_directly_and_the_exact_gaussian() -> None:
    from opacus.accountants import PRVAccountant, RDPAccountant

    sigma, rounds = 3.0, 8
    ours = {m: PrivacyAccountant(delta=DELTA, mechanism=m) for m in ("rdp", "prv")}
    for accountant in ours.values():
        for _ in range(rounds):
            accountant.record_round(noise_multiplier=sigma)
    rdp, prv = RDPAccountant(), PRVAccountant()
    for direct in (rdp, prv):
        for _ in range(rounds):
            direct.step(noise_multiplier=sigma, sample_rate=1.0)
    assert ours["rdp"].epsilon() == rdp.get_epsilon(DELTA)
    assert ours["prv"].epsilon() == pytest.approx(prv.get_epsilon(DELTA), rel=1e-9)
    # T rounds of the full-batch Gaussian mechanism are one Gaussian with mu = sqrt(T) / sigma.
    exact = gaussian_epsilon(math.sqrt(rounds) / sigma, DELTA)
    assert exact - 0.01 <= ours["prv"].epsilon() <= exact + 0.05
    assert ours["rdp"].epsilon() >= exact  # RDP is a valid but looser bound


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_noise_for_epsilon_round_trips_to_the_target(mechanism: str) -> None:
    target, rounds = 4.0, 10
    sigma = noise_for_epsilon(target, DELTA, rounds, mechanism=mechanism)
    accountant = PrivacyAccountant(delta=DELTA, mechanism=mechanism)
    for _ in range(rounds):
        epsilon = accountant.record_round(noise_multiplier=sigma)
    assert target - 0.05 <= epsilon <= target
    # A bit less noise overspends: the derived sigma is (nearly) the smallest that fits.
    tighter = PrivacyAccountant(delta=DELTA, mechanism=mechanism)
    tighter.record(noise_multiplier=sigma * 0.97, steps=rounds)
    assert tighter.epsilon() > target


def test_noise_for_epsilon_with_local_sampling_and_bad_budgets() -> None:
    sigma = noise_for_epsilon(2.0, DELTA, 5, sample_rate=0.1, steps_per_round=10)
    accountant = PrivacyAccountant(delta=DELTA)
    for _ in range(5):
        epsilon = accountant.record_round(noise_multiplier=sigma, sample_rate=0.1, steps=10)
    assert 1.95 <= epsilon <= 2.0
    with pytest.raises(PrivacyError):
        noise_for_epsilon(0.0, DELTA, 5)
    with pytest.raises(PrivacyError):
        noise_for_epsilon(1.0, DELTA, 0)
    with pytest.raises(UnknownNameError):
        noise_for_epsilon(1.0, DELTA, 5, mechanism="gdp")


def test_accountant_state_dict_round_trips_through_json() -> None:
    accountant = PrivacyAccountant(delta=DELTA)
    accountant.record_round(noise_multiplier=2.0)
    accountant.record_round(noise_multiplier=1.5, sample_rate=0.5, steps=3)
    state = json.loads(json.dumps(accountant.state_dict()))
    restored = PrivacyAccountant(delta=0.5)
    restored.load_state_dict(state)
    assert restored.delta == DELTA and restored.epsilons == accountant.epsilons
    assert restored.history == accountant.history == [(2.0, 1.0, 1), (1.5, 0.5, 3)]
    assert restored.epsilon() == accountant.epsilon()
    # Recording continues from the restored history.
    assert restored.record_round(noise_multiplier=2.0) == accountant.record_round(
        noise_multiplier=2.0
    )


@pytest.mark.parametrize(
    "change",
    [
        {"mechanism": "prv"},
        {"delta": 2.0},
        {"history": [[0.0, 1.0, 1]]},
        {"history": [[1.0, 1.5, 1]]},
        {"history": [[1.0, 1.0, 0]]},
        {"history": [[1.0, 1.0]]},
        {"epsilons": [-1.0]},
        {"history": "nope"},
    ],
)
def test_accountant_refuses_malformed_state(change: dict[str, object]) -> None:
    accountant = PrivacyAccountant(delta=DELTA)
    state = {**accountant.state_dict(), **change}
    with pytest.raises(PrivacyError):
        accountant.load_state_dict(state)


def test_accountant_rejects_bad_settings() -> None:
    with pytest.raises(UnknownNameError):
        PrivacyAccountant(delta=DELTA, mechanism="moments")
    with pytest.raises(PrivacyError):
        PrivacyAccountant(delta=0.0)
    accountant = PrivacyAccountant(delta=DELTA)
    for kwargs in ({"noise_multiplier": 0.0}, {"noise_multiplier": 1.0, "sample_rate": 0.0}):
        with pytest.raises(PrivacyError):
            accountant.record(**kwargs)  # type: ignore[arg-type]


# --- PrivacyConfig -------------------------------------------------------------------------------


def test_privacy_config_defaults_off_and_resolves_noise() -> None:
    assert not PrivacyConfig().enabled
    config = PrivacyConfig(clip=1.0, noise_multiplier=1.3)
    assert config.enabled and resolve_noise_multiplier(config, rounds=5) == 1.3
    derived = resolve_noise_multiplier(PrivacyConfig(clip=1.0, target_epsilon=4.0), rounds=10)
    assert derived == noise_for_epsilon(4.0, DELTA, 10)
    with pytest.raises(PrivacyError):
        resolve_noise_multiplier(PrivacyConfig(), rounds=5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip": 1.0, "noise_multiplier": 1.0, "target_epsilon": 3.0},
        {"clip": 1.0},
        {"noise_multiplier": 1.0},
        {"target_epsilon": 1.0},
        {"unit": "example"},
        {"clip": 1.0, "noise_multiplier": 1.0, "unit": "batch"},
        {"clip": 0.0, "noise_multiplier": 1.0},
        {"clip": float("inf"), "noise_multiplier": 1.0},
        {"clip": 1.0, "noise_multiplier": -1.0},
        {"clip": 1.0, "target_epsilon": float("nan")},
        {"clip": 1.0, "noise_multiplier": 1.0, "delta": 1.0},
        {"clip": 1.0, "noise_multiplier": 1.0, "accountant": "gdp"},
    ],
)
def test_privacy_config_rejects(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        PrivacyConfig(**kwargs)  # type: ignore[arg-type]
