"""Mixing rules and learned trust on tiny hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedtorrent.config import MixingConfig
from fedtorrent.errors import ConfigError, StateError
from fedtorrent.mixing.rules import (
    coordinate_median,
    identity_weights,
    krum,
    krum_scores,
    metropolis_row,
    metropolis_weights,
    mix,
    mix_stack,
    trimmed_mean,
    uniform_weights,
)
from fedtorrent.mixing.trust import (
    TrustLearner,
    flat_views,
    learn_trust,
    model_loss_fn,
    negative_entropy,
    prefer_learned,
    trust_weights,
)
from fedtorrent.sim.topology import complete_graph, ring_graph
from fedtorrent.state import flatten


def _members(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    members = torch.rand(n, n, generator=generator) < 0.4
    return members | torch.eye(n, dtype=torch.bool)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 9), seed=st.integers(0, 10_000), floor=st.sampled_from([0.0, 0.05, 0.3]))
def test_every_weighting_gives_rows_that_sum_to_one(n: int, seed: int, floor: float) -> None:
    members = _members(n, seed)
    logits = torch.randn(n, n, generator=torch.Generator().manual_seed(seed)) * 5
    for weights in (
        uniform_weights(members),
        metropolis_weights(members),
        trust_weights(logits, members, floor=floor),
        identity_weights(n),
    ):
        assert torch.allclose(weights.sum(dim=1), torch.ones(n), atol=1e-5)
        assert bool((weights >= 0).all())
    learned = trust_weights(logits, members, floor=floor)
    assert bool((learned[~members] == 0).all()), "non-members must get exactly zero weight"


def test_none_leaves_every_vector_unchanged() -> None:
    stack = torch.randn(5, 7)
    assert torch.equal(mix(identity_weights(5), stack), stack)
    per_node = torch.randn(3, 4, 7)
    assert torch.equal(mix_stack(per_node, config=MixingConfig(rule="none")), per_node[:, 0])


def test_fixed_on_a_complete_graph_is_the_average() -> None:
    stack = torch.randn(6, 11)
    members = complete_graph(6) | torch.eye(6, dtype=torch.bool)
    mixed = mix(uniform_weights(members), stack)
    assert torch.allclose(mixed, stack.mean(dim=0).expand(6, -1), atol=1e-6)
    single = mix_stack(stack, config=MixingConfig(rule="fixed"))
    assert torch.allclose(single, stack.mean(dim=0), atol=1e-6)


def test_metropolis_is_doubly_stochastic_on_an_undirected_graph() -> None:
    adjacency = ring_graph(5)
    adjacency[0, 2] = adjacency[2, 0] = True  # uneven degrees
    weights = metropolis_weights(adjacency)
    assert torch.allclose(weights, weights.T)
    assert torch.allclose(weights.sum(dim=0), torch.ones(5))
    degrees = adjacency.sum(dim=1)
    row = metropolis_row(int(degrees[0]), degrees[adjacency[0]])
    assert torch.allclose(row[1:], weights[0][adjacency[0]])
    assert math.isclose(float(row.sum()), 1.0, rel_tol=1e-6)


def test_mix_rejects_shapes_that_do_not_fit() -> None:
    with pytest.raises(ConfigError):
        mix(torch.ones(3), torch.ones(4, 5))
    with pytest.raises(ConfigError):
        uniform_weights(torch.zeros(2, 2, dtype=torch.bool))


def test_coordinate_median_on_hand_made_rows() -> None:
    odd = torch.tensor([[1.0, 10.0], [2.0, 20.0], [100.0, -5.0]])
    assert torch.equal(coordinate_median(odd), torch.tensor([2.0, 10.0]))
    even = torch.tensor([[1.0], [2.0], [4.0], [100.0]])
    assert torch.equal(coordinate_median(even), torch.tensor([3.0]))
    batched = torch.stack([odd, odd * 2])
    assert torch.equal(coordinate_median(batched)[1], torch.tensor([4.0, 20.0]))


def test_trimmed_mean_drops_the_extremes() -> None:
    stack = torch.tensor([[-1000.0], [1.0], [2.0], [3.0], [1000.0]])
    assert torch.equal(trimmed_mean(stack, trim_ratio=0.2), torch.tensor([2.0]))
    assert math.isclose(float(trimmed_mean(stack, trim_ratio=0.0)), 1.2, rel_tol=1e-6)
    with pytest.raises(ConfigError):
        trimmed_mean(stack, trim_ratio=0.5)


def test_krum_picks_a_vector_from_the_honest_cluster() -> None:
    honest = torch.tensor([[1.0, 1.0], [1.1, 0.9], [0.9, 1.1], [1.0, 1.05]])
    attackers = torch.tensor([[50.0, -50.0], [60.0, -40.0]])
    stack = torch.cat([attackers[:1], honest, attackers[1:]])
    chosen = krum(stack, byzantine=2)
    assert any(torch.equal(chosen, row) for row in honest)
    scores = krum_scores(stack, byzantine=2)
    assert scores[0] > scores[1:5].max() and scores[5] > scores[1:5].max()
    assert torch.equal(krum(stack[:1], byzantine=1), stack[0])


def test_robust_rules_through_mix_stack() -> None:
    stack = torch.tensor([[1.0], [2.0], [3.0], [4.0], [500.0]])
    assert float(mix_stack(stack, config=MixingConfig(rule="median"))) == 3.0
    assert float(mix_stack(stack, config=MixingConfig(rule="trimmed_mean"))) == 3.0
    assert float(mix_stack(stack, config=MixingConfig(rule="krum", byzantine=1))) in {2.0, 3.0}
    with pytest.raises(ConfigError):
        mix_stack(stack, config=MixingConfig(rule="learned"))


def test_weight_floor_and_entropy_penalty_keep_trust_near_uniform() -> None:
    logits = torch.tensor([6.0, 0.0, 0.0, 0.0])
    floored = trust_weights(logits, floor=0.1)
    assert float(floored.min()) >= 0.1 - 1e-6
    assert torch.allclose(trust_weights(logits, floor=0.9), torch.full((4,), 0.25))
    assert float(negative_entropy(torch.full((4,), 0.25))) == pytest.approx(-math.log(4))

    target = torch.tensor([[3.0], [0.0], [0.0]])

    def loss(weights: torch.Tensor) -> torch.Tensor:  # wants all weight on row 0
        return (mix(weights, target) - 3.0).square().sum(dim=-1)

    start = torch.zeros(3)
    free = trust_weights(learn_trust(start, mixed_loss=loss, lr=1.0, steps=50).logits)
    held = trust_weights(
        learn_trust(start, mixed_loss=loss, lr=1.0, steps=50, entropy_penalty=5.0).logits
    )
    assert float(free[0]) > float(held[0]) > 1 / 3


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=generator)
    centers = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    return centers[y] + torch.randn(n, 2, generator=generator), y


def _fitted(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return flatten(model.state_dict())


def test_learned_trust_moves_weight_away_from_a_garbage_peer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3))
    x, y = _blobs(200, seed=1)
    own = _fitted(model, x[:60], y[:60])
    good = [
        _fitted(model, x[60 + 40 * k : 100 + 40 * k], y[60 + 40 * k : 100 + 40 * k]) for k in (0, 1)
    ]
    garbage = torch.randn(own.shape, generator=torch.Generator().manual_seed(2)) * 20
    stack = torch.stack([own, good[0], garbage, good[1]])
    val_x, val_y = _blobs(100, seed=3)
    learner = TrustLearner(MixingConfig(trust_lr=5.0, trust_steps=30))
    cohort = ["good-a", "bad", "good-b"]
    assert torch.allclose(learner.weights(cohort), torch.full((4,), 0.25))
    weights = learner.learn(cohort, stack, model_loss_fn(model, val_x, val_y))
    assert math.isclose(float(weights.sum()), 1.0, rel_tol=1e-5)
    assert float(weights[2]) < 0.05, weights
    assert float(weights[[0, 1, 3]].sum()) > 0.95


def test_prefer_learned_needs_the_margin_and_handles_non_finite_losses() -> None:
    learned = torch.tensor([0.90, 0.995, 1.0, float("nan"), 5.0])
    uniform = torch.tensor([1.00, 1.0, 1.0, 1.0, float("inf")])
    assert prefer_learned(learned, uniform, margin=0.01).tolist() == [
        True,
        False,
        False,
        False,
        True,
    ]
    assert prefer_learned(learned, uniform, margin=0.0).all()  # the check is off


def test_held_out_check_keeps_uniform_unless_learned_trust_is_clearly_better() -> None:
    stack = torch.tensor([[0.0], [1.0], [2.0]])

    def loss(flat: torch.Tensor) -> torch.Tensor:  # uniform (mean 1.0) is optimal
        return (flat - 1.0).square().sum() + 1.0

    def tilted(flat: torch.Tensor) -> torch.Tensor:  # pulls the fit off uniform
        return (flat - 1.5).square().sum() + 1.0

    learner = TrustLearner(MixingConfig(trust_lr=2.0, trust_steps=5, trust_margin=0.01))
    weights = learner.learn(["a", "b"], stack, tilted, check_loss_fn=loss)
    assert learner.last_check is False
    assert torch.allclose(weights, torch.full((3,), 1 / 3))
    assert learner.state_dict()["peers"]["b"] > 0  # the logits still learned
    weights = learner.learn(["a", "b"], stack, tilted, check_loss_fn=tilted)
    assert learner.last_check is True
    assert float(weights[2]) > 0.4
    off = TrustLearner(MixingConfig(trust_lr=2.0, trust_steps=5, trust_margin=0.0))
    assert float(off.learn(["a", "b"], stack, tilted, check_loss_fn=loss)[2]) > 0.4
    assert off.last_check is None
    with pytest.raises(ConfigError):
        MixingConfig(trust_margin=-0.1)


def test_held_out_check_keeps_learned_trust_against_a_garbage_peer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3))
    x, y = _blobs(200, seed=1)
    stack = torch.stack(
        [
            _fitted(model, x[:100], y[:100]),
            _fitted(model, x[100:], y[100:]),
            torch.randn(9, generator=torch.Generator().manual_seed(2)) * 20,
        ]
    )
    val_x, val_y = _blobs(100, seed=3)
    held_x, held_y = _blobs(100, seed=4)
    learner = TrustLearner(MixingConfig(trust_lr=5.0, trust_steps=30, trust_margin=0.01))
    weights = learner.learn(
        ["good", "bad"],
        stack,
        model_loss_fn(model, val_x, val_y),
        check_loss_fn=model_loss_fn(model, held_x, held_y),
    )
    assert learner.last_check is True
    assert float(weights[2]) < 0.05, weights


def test_trust_persists_for_absent_peers_and_round_trips() -> None:
    learner = TrustLearner(MixingConfig(trust_lr=2.0, trust_steps=5))
    stack = torch.tensor([[0.0], [1.0], [5.0]])

    def loss(flat: torch.Tensor) -> torch.Tensor:  # prefers the mix close to 1.0
        return (flat - 1.0).square().sum()

    learner.learn(["a", "b"], stack, loss)
    before = learner.state_dict()
    assert before["peers"]["a"] > before["peers"]["b"]
    learner.learn(["a", "c"], stack, loss)  # b is absent this round
    after = learner.state_dict()
    assert after["peers"]["b"] == before["peers"]["b"]
    assert "c" in after["peers"]
    twin = TrustLearner(MixingConfig())
    twin.load_state_dict(after)
    assert torch.equal(twin.logits(["a", "b", "c"]), learner.logits(["a", "b", "c"]))
    assert float(twin.logits(["new"])[1]) == 0.0
    for bad in ({"self": float("nan"), "peers": {}}, {"self": 0.0, "peers": {"a": "x"}}, {}):
        with pytest.raises(StateError):
            twin.load_state_dict(bad)
    with pytest.raises(ConfigError):
        learner.logits(["a", "a"])
    with pytest.raises(ConfigError):
        learner.learn(["a"], stack, loss)


def test_learn_trust_leaves_non_members_and_input_alone() -> None:
    logits = torch.tensor([[0.5, 2.0, -1.0]])
    members = torch.tensor([[True, True, False]])
    stack = torch.tensor([[0.0], [1.0], [9.0]])
    new = learn_trust(
        logits,
        mixed_loss=lambda w: (mix(w, stack) - 1.0).square().sum(dim=-1),
        members=members,
        lr=1.0,
        steps=5,
    ).logits
    assert float(new[0, 2]) == -1.0
    assert not torch.equal(new, logits)
    assert torch.equal(logits, torch.tensor([[0.5, 2.0, -1.0]]))
    assert torch.equal(
        learn_trust(logits, mixed_loss=lambda w: w.sum(dim=-1), lr=1.0, steps=0).logits, logits
    )


def test_model_loss_fn_matches_the_module() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x, y = torch.randn(8, 2, 2), torch.randint(0, 2, (8,))
    flat = flatten(model.state_dict())
    expected = nn.functional.cross_entropy(model(x), y)
    assert torch.allclose(model_loss_fn(model, x, y)(flat), expected)
    views = flat_views(torch.stack([flat, flat]), model.state_dict())
    assert views["1.weight"].shape == (2, 3, 4)
    with pytest.raises(StateError):
        flat_views(flat[:-1], model.state_dict())


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.lists(
            st.one_of(
                st.floats(width=32, allow_nan=True, allow_infinity=True),
                st.sampled_from([3e38, -3e38, 1e-45]),
            ),
            min_size=1,
            max_size=9,
        ),
        min_size=1,
        max_size=5,
    ).filter(lambda rows: len({len(r) for r in rows}) == 1)
)
def test_finite_rows_agrees_with_the_elementwise_check(values: list[list[float]]) -> None:
    from fedtorrent.mixing.screen import finite_rows

    x = torch.tensor(values, dtype=torch.float32)
    assert torch.equal(finite_rows(x), torch.isfinite(x).all(dim=1))


def test_the_chunked_float64_gram_gives_the_direct_distances(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedtorrent.mixing import screen

    monkeypatch.setattr(screen, "_DIRECT_FLOATS", 16 * 300)  # chunks of 300 columns
    generator = torch.Generator().manual_seed(0)
    own = torch.randn(7, 5000, generator=generator)
    others = torch.randn(9, 5000, generator=generator) * 3
    rows, cols = torch.meshgrid(torch.arange(7), torch.arange(9), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    expected = (others[cols].double() - own[rows].double()).norm(dim=1)
    for a, b in ((own, others), (own, own)):
        pairs = (rows, cols) if b is others else (rows, rows % 7)
        got = screen.pair_distances(a, b, *pairs)  # dense: the Gram path, in chunks
        want = (
            expected if b is others else (own[pairs[1]].double() - own[rows].double()).norm(dim=1)
        )
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)
    norms = screen.square_norms(own)
    assert torch.allclose(norms, own.double().square().sum(dim=1), rtol=1e-12)
