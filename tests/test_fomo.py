"""FedFomo's mixing rule: the paper's weights on hand-made cases, and one round for both drivers.

The loss in the round tests is ``L_i(theta) = ||theta - t_i||^2`` with the receiver's target
``t_i`` passed as its "validation batch", so every weight can be computed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedtorrent.config import MixingConfig
from fedtorrent.mixing.fomo import fomo_weights
from fedtorrent.mixing.round import Cohorts, Mixed, Trust, mix_round

FOMO = MixingConfig(rule="fedfomo", plausibility=0.0)


def squared_distance(mixed: torch.Tensor, x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """``(R,)`` ``||mixed_r - x_r||^2``: each receiver's batch ``x`` is its target vector."""
    return ((mixed - x) ** 2).sum(dim=1)


def target_trust(targets: torch.Tensor, draws: list[int] | None = None) -> Trust:
    """A Trust whose one batch is each receiver's target (``draws`` counts the draws)."""

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        if draws is not None:
            draws.append(1)
        return targets, torch.zeros(len(targets))

    size = targets.shape[0]
    return Trust(logits=torch.zeros(size, size), draw=draw, losses=squared_distance)


def one_receiver(vectors: list[float], target: float, *, start: float | None = None) -> Mixed:
    """A peer's round over ``[self, *heard]`` on one-dimensional vectors.

    ``start`` is the state the peer trained from (None: its trained state is the reference).
    """
    cohorts = Cohorts(
        shared=torch.tensor(vectors).unsqueeze(1),
        members=torch.ones(1, len(vectors), dtype=torch.bool),
        self_column=torch.zeros(1, dtype=torch.long),
        start=None if start is None else torch.tensor([[start]]),
    )
    return mix_round(cohorts, FOMO, target_trust(torch.tensor([[target]])))


def test_the_neighbour_that_lowers_the_loss_takes_all_the_weight() -> None:
    # Own 0 (loss 1 against target 1); A = 0.5 (loss 0.25, gain 0.75, distance 0.5); B = -1
    # (loss 4: worse). w_A = 0.75 / 0.5 = 1.5, w_B = max(0, -3 / 1) = 0; normalised: A gets 1.
    mixed = one_receiver([0.0, 0.5, -1.0], target=1.0)
    assert mixed.weights is not None
    assert mixed.weights[0].tolist() == [0.0, 1.0, 0.0]
    assert mixed.params[0].tolist() == [0.5]  # theta + 1.0 * (A - theta)
    assert not bool(mixed.excluded.any()) and mixed.logits is None


def test_positive_weights_are_normalised_by_gain_over_distance() -> None:
    # A = 0.5: 0.75 / 0.5 = 1.5; C = 1.5: 0.75 / 1.5 = 0.5; B = -1 worse. Normalised 3/4, 1/4.
    mixed = one_receiver([0.0, 0.5, -1.0, 1.5], target=1.0)
    assert mixed.weights is not None
    assert mixed.weights[0].tolist() == pytest.approx([0.0, 0.75, 0.0, 0.25])
    assert mixed.params[0].tolist() == pytest.approx([0.75])


def test_the_own_trained_state_is_a_candidate_measured_from_the_start_of_the_round() -> None:
    # Trained from 0 (loss 1) to 0.4 (loss 0.36): gain 0.64 over distance 0.4, w = 1.6. A = 0.5
    # and B = -1 as above, from 0: 1.5 and 0. Normalised: self 1.6 / 3.1, A 1.5 / 3.1.
    mixed = one_receiver([0.4, 0.5, -1.0], target=1.0, start=0.0)
    assert mixed.weights is not None
    assert mixed.weights[0].tolist() == pytest.approx([1.6 / 3.1, 1.5 / 3.1, 0.0])
    # theta^{t-1} + sum_j w_j (theta_j - theta^{t-1}) with theta^{t-1} = 0
    assert mixed.params[0].tolist() == pytest.approx([(1.6 * 0.4 + 1.5 * 0.5) / 3.1])


def test_no_improvement_keeps_the_own_state() -> None:
    # Own 1 is the target (loss 0): nobody can lower it, so the round keeps it, self weight 1.
    mixed = one_receiver([1.0, 0.5, 3.0], target=1.0)
    assert mixed.weights is not None and mixed.weights[0].tolist() == [1.0, 0.0, 0.0]
    assert mixed.params[0].tolist() == [1.0]
    # Trained away from the target (1 -> 0.5), and every neighbour worse than the start too:
    # the own trained state is kept (FedFomo would keep the start; see mixing.fomo).
    mixed = one_receiver([0.5, 3.0, -2.0], target=1.0, start=1.0)
    assert mixed.weights is not None and mixed.weights[0].tolist() == [1.0, 0.0, 0.0]
    assert mixed.params[0].tolist() == [0.5]


def test_a_neighbour_equal_to_the_own_state_or_with_a_non_finite_loss_gets_nothing() -> None:
    own = torch.tensor([1.0])
    weights = fomo_weights(
        own,
        torch.tensor([[1.0, 1.0, float("nan"), 0.5]]),
        torch.tensor([[0.0, 0.0, 1.0, 2.0]]),
        torch.tensor([[False, True, True, True]]),
        torch.tensor([[True, False, False, False]]),
    )
    assert weights.tolist() == [[0.0, 0.0, 0.0, 1.0]]
    # A receiver whose own loss is not finite moves to the finite ones, weighted by 1 / distance.
    weights = fomo_weights(
        torch.tensor([float("inf")]),
        torch.tensor([[0.0, 5.0, 7.0]]),
        torch.tensor([[0.0, 1.0, 3.0]]),
        torch.tensor([[False, True, True]]),
        torch.tensor([[True, False, False]]),
    )
    assert weights[0].tolist() == pytest.approx([0.0, 0.75, 0.25])


def test_a_member_whose_loss_is_not_finite_is_excluded() -> None:
    shared = torch.tensor([[0.0], [0.5], [3e38]])  # the last one's squared loss overflows
    cohorts = Cohorts(
        shared=shared,
        members=torch.ones(1, 3, dtype=torch.bool),
        self_column=torch.zeros(1, dtype=torch.long),
    )
    mixed = mix_round(cohorts, FOMO, target_trust(torch.tensor([[1.0]])))
    assert mixed.excluded[0].tolist() == [False, False, True]
    assert mixed.members[0].tolist() == [True, True, False]
    assert mixed.weights is not None and mixed.weights[0].tolist() == [0.0, 1.0, 0.0]


def test_without_a_batch_or_a_cohort_every_receiver_keeps_its_own() -> None:
    draws: list[int] = []
    shared = torch.tensor([[0.0], [0.5]])
    alone = Cohorts(
        shared=shared,
        members=torch.eye(2, dtype=torch.bool),
        self_column=torch.arange(2),
    )
    mixed = mix_round(alone, FOMO, target_trust(torch.ones(2, 1), draws))
    assert mixed.weights is not None and torch.equal(mixed.weights, torch.eye(2))
    assert draws == []  # nothing to score: no batch drawn
    paired = Cohorts(
        shared=shared, members=torch.ones(2, 2, dtype=torch.bool), self_column=torch.arange(2)
    )
    unfitted = Trust(
        logits=torch.zeros(2, 2), draw=lambda: (torch.ones(2, 1), torch.zeros(2)),
        losses=squared_distance, fit=False,
    )  # fmt: skip
    for trust in (unfitted, None):
        mixed = mix_round(paired, FOMO, trust)
        assert mixed.weights is not None and torch.equal(mixed.weights, torch.eye(2))
        assert torch.equal(mixed.params, shared)


@pytest.mark.parametrize("private", [False, True])
def test_every_node_at_once_mixes_as_each_peer_alone(private: bool) -> None:
    """The engine's call (``R = M = N``) and a peer's (``R = 1``) give the same round."""
    generator = torch.Generator().manual_seed(3)
    n, p = 5, 4
    shared = torch.randn(n, p, generator=generator)
    own = shared + 0.1 * torch.randn(n, p, generator=generator) if private else None
    start = shared + 0.3 * torch.randn(n, p, generator=generator)
    targets = torch.randn(n, p, generator=generator) * 0.5
    members = torch.rand(n, n, generator=generator) < 0.6
    members |= torch.eye(n, dtype=torch.bool)
    config = MixingConfig(rule="fedfomo")  # the screen on, as by default
    everyone = mix_round(
        Cohorts(shared=shared, members=members, self_column=torch.arange(n), own=own, start=start),
        config,
        target_trust(targets),
    )
    assert everyone.weights is not None
    moved = 0
    for i in range(n):
        heard = [j for j in range(n) if j != i and bool(members[i, j])]
        order = [i, *heard]
        alone = mix_round(
            Cohorts(
                shared=shared[order],
                members=torch.ones(1, len(order), dtype=torch.bool),
                self_column=torch.zeros(1, dtype=torch.long),
                own=None if own is None else own[i : i + 1],
                start=start[i : i + 1],
            ),
            config,
            target_trust(targets[i : i + 1]),
        )
        assert alone.weights is not None
        assert torch.allclose(alone.weights[0], everyone.weights[i, order], atol=1e-6)
        assert float(everyone.weights[i].sum()) == pytest.approx(1.0)
        assert torch.allclose(alone.params[0], everyone.params[i], atol=1e-6)
        if everyone.public is not None:
            assert alone.public is not None
            assert torch.allclose(alone.public[0], everyone.public[i], atol=1e-6)
        moved += int(float(everyone.weights[i, i]) < 1)
    assert moved > 0  # some receivers did move towards a neighbour
    assert float(everyone.weights.diagonal().max()) > 0  # and some trusted their own training


def test_simulate_with_fedfomo_learns_and_records_its_weights(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedtorrent.cli import app
    from fedtorrent.metrics.records import read_records

    result = CliRunner().invoke(
        app,
        [
            "simulate", "--dataset", "digits", "--nodes", "6", "--rounds", "4",
            "--mixing", "fedfomo", "--mixing", "none", "--seed", "0",
            "--out", str(tmp_path), "--no-plots", "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    final = [r for r in read_records(tmp_path / "final.jsonl") if r["mixing"] == "fedfomo"]
    assert len(final) == 6
    assert min(r["accuracy"] for r in final) > 0.5  # 10 classes: learning happened
    by_mixing = json.loads((tmp_path / "summary.json").read_text())["by_mixing"]
    # iid nodes: every model lowers everyone's loss, so FedFomo mixes and beats training alone
    assert by_mixing["fedfomo"]["accuracy_mean"] > by_mixing["none"]["accuracy_mean"] + 0.02
    snapshots = [t for t in read_records(tmp_path / "trust.jsonl") if t["mixing"] == "fedfomo"]
    assert [t["round"] for t in snapshots] == [1, 2, 3, 4]  # every round, like learned trust
    for snapshot in snapshots:
        weights = torch.tensor(snapshot["weights"])
        assert torch.allclose(weights.sum(dim=1), torch.ones(6), atol=1e-6)
        assert bool((weights >= 0).all())
    rounds = [r for r in read_records(tmp_path / "rounds.jsonl") if r["mixing"] == "fedfomo"]
    assert all(0 <= r["self_weight"] <= 1 for r in rounds)
    last = torch.tensor(snapshots[-1]["weights"])
    assert float(last.diagonal().max()) < 0.5  # everybody mixed with its neighbours


def test_create_writes_a_fedfomo_session(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedtorrent.cli import app
    from fedtorrent.net.torrent import load_torrent

    path = tmp_path / "s.torrent"
    result = CliRunner().invoke(
        app, ["create", "-o", str(path), "--dataset", "digits", "--mixing", "fedfomo"]
    )
    assert result.exit_code == 0, result.output
    assert load_torrent(path).session.mixing.rule == "fedfomo"
