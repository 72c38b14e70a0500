"""Extreme finite values (issue 10, finding 1): no received state, however large, breaks a round.

Every shared value ``1e3``, ``1e10`` or ``3e38`` (finite in float32), or ``+-s`` at random: the
plausibility screen rejects such states before any rule mixes, learned trust stays finite even
without the screen, and no rule overflows. Unit tests on tiny stacks, short simulator runs for
every rule, peers on the in-memory twin, and one swarm of real peer processes.
"""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import require_dataset
from fedtorrent.adversary import AttackConfig, attack_params
from fedtorrent.config import (
    MIXING_RULES,
    DataConfig,
    MixingConfig,
    ModelConfig,
    SimConfig,
    TrainConfig,
)
from fedtorrent.data.datasets import Dataset
from fedtorrent.errors import ConfigError
from fedtorrent.metrics.records import read_records
from fedtorrent.mixing.fomo import fomo_weights
from fedtorrent.mixing.rules import (
    coordinate_median,
    krum,
    krum_scores,
    metropolis_row,
    mix_stack,
    trimmed_mean,
)
from fedtorrent.mixing.screen import (
    finite_or_own,
    implausible,
    implausible_pairs,
    pair_distances,
    screen_stack,
)
from fedtorrent.mixing.trust import EXCLUDED_DROP, TrustLearner, learn_trust, model_loss_fn
from fedtorrent.state import flatten

pytestmark = pytest.mark.timeout(120)
ATTACKS = [
    ("extreme", 1e3),
    ("extreme", 1e10),
    ("extreme", 3e38),
    ("extreme_mixed", 1e10),
    ("extreme_mixed", 3e38),
]
ROBUST = ("median", "trimmed_mean", "krum")


def _extreme(kind: str, scale: float, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    zeros = torch.zeros(shape)
    return attack_params(
        AttackConfig(kind, scale),
        zeros,
        reference=zeros,
        initial=zeros[0] if zeros.ndim > 1 else zeros,
        generator=torch.Generator().manual_seed(seed),
    )


# -- the screen --------------------------------------------------------------------------------


def test_screen_rejects_far_states_and_keeps_honest_ones() -> None:
    def reject(distances: list[float], own: float, multiple: float = 10.0) -> list[bool]:
        d = torch.tensor(distances, dtype=torch.float64)
        out = implausible(d, torch.tensor(own, dtype=torch.float64), multiple=multiple)
        return [bool(x) for x in out]

    assert reject([1.0, 1.2, 0.9, 50.0], own=5.0) == [False, False, False, True]
    assert reject([1.0, 1.2, 0.9, 9.0], own=5.0) == [False] * 4  # within 10x the median
    # A lone neighbour, and one attacker of two, are judged against the model's own norm.
    assert reject([30.0], own=2.0) == [True]
    assert reject([3.0], own=2.0) == [False]
    assert reject([1.0, 1e10], own=2.0) == [False, True]
    # Honest nodes that drift apart together (label skew) move the reference with them.
    assert reject([40.0, 45.0, 50.0], own=2.0) == [False] * 3
    assert reject([1.0, math.inf, math.nan], own=2.0) == [False, True, True]
    assert reject([5.0], own=0.0) == [False]  # reference 0: no scale, only non-finite rejected
    assert reject([1.0, 1e30], own=2.0, multiple=0.0) == [False, False]  # off
    # Rows of a padded batch: padding never counts and is never rejected.
    d = torch.tensor([[1.0, 100.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    out = implausible(d, torch.tensor([2.0, 2.0], dtype=torch.float64), multiple=10, valid=valid)
    assert out.tolist() == [[False, True, False], [False, False, False]]
    rows = torch.tensor([0, 0, 1])
    pairs = implausible_pairs(
        rows, torch.tensor([1.0, 100.0, 1.0], dtype=torch.float64), torch.full((2,), 2.0),
        multiple=10,
    )  # fmt: skip
    assert pairs.tolist() == [False, True, False]


def test_pair_distances_are_exact_for_near_and_huge_vectors() -> None:
    generator = torch.Generator().manual_seed(0)
    own = torch.randn(6, 50, generator=generator) * 10
    others = own + 1e-6 * torch.randn(6, 50, generator=generator)  # the Gram form cancels here
    others[2] = _extreme("extreme_mixed", 3e38, (50,))
    others[3] = _extreme("extreme", 3.4e38, (50,))
    full = torch.ones(6, 6, dtype=torch.bool)
    for adjacency in (full, torch.eye(6, dtype=torch.bool).roll(1, dims=1)):  # dense, sparse
        rows, cols = adjacency.nonzero().unbind(1)
        got = pair_distances(own, others, rows, cols)
        expected = (others.double()[cols] - own.double()[rows]).norm(dim=1)
        assert bool(torch.isfinite(got).all())
        assert torch.allclose(got, expected, rtol=1e-9, atol=0)


# -- every rule on tiny stacks --------------------------------------------------------------------


def _honest_stack(k: int = 4, p: int = 30) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    centre = torch.randn(p, generator=generator)
    return centre + 0.05 * torch.randn(k, p, generator=generator)


def _linear_loss(p: int) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 5))
    x, y = torch.randn(64, 5), torch.randint(0, 5, (64,))
    assert sum(v.numel() for v in model.state_dict().values()) == p
    return model, model_loss_fn(model.eval(), x, y)


def _mix(rule: str, stack: torch.Tensor, cohort: list[str], *, screen: bool) -> torch.Tensor:
    """One node's round of ``rule`` on ``stack`` (own row 0), as the peer runs it."""
    config = MixingConfig(rule=rule, trim_ratio=0.2, byzantine=1, plausibility=10.0)
    if screen:
        rejected, _ = screen_stack(stack, multiple=config.plausibility)
        keep = [0, *(1 + i for i, out in enumerate(rejected.tolist()) if not out)]
        cohort = [cohort[i - 1] for i in keep[1:]]
        stack = stack[keep]
    k = len(cohort)
    weights = None
    if rule == "learned":
        _, loss = _linear_loss(stack.shape[1])
        weights = TrustLearner(config).learn(cohort, stack, loss)  # type: ignore[arg-type]
    elif rule == "metropolis":
        weights = metropolis_row(k, torch.full((k,), float(k)))
    elif rule == "fixed":
        weights = torch.full((1 + k,), 1.0 / (1 + k))
    elif rule == "fedfomo":  # the own trained row is the reference (no start state)
        _, loss = _linear_loss(stack.shape[1])
        losses = torch.stack([loss(row) for row in stack]).reshape(1, -1)  # type: ignore[operator]
        distances = (stack - stack[0]).norm(dim=1).reshape(1, -1)
        is_self = torch.zeros(1, 1 + k, dtype=torch.bool)
        is_self[0, 0] = True
        everyone = torch.ones_like(is_self)
        weights = fomo_weights(losses[:, 0], losses, distances, everyone, is_self)[0]
    mixed, _ = finite_or_own(mix_stack(stack, config=config, weights=weights), stack[0])
    return mixed


@pytest.mark.parametrize("rule", MIXING_RULES)
@pytest.mark.parametrize(("kind", "scale"), ATTACKS)
def test_every_rule_ignores_an_extreme_state_behind_the_screen(
    rule: str, kind: str, scale: float
) -> None:
    honest = _honest_stack(k=4, p=30)
    stack = torch.cat([honest, _extreme(kind, scale, (1, 30))])
    mixed = _mix(rule, stack, ["a", "b", "c", "evil"], screen=True)
    clean = _mix(rule, honest, ["a", "b", "c"], screen=True)
    assert bool(torch.isfinite(mixed).all())
    assert torch.allclose(mixed, clean, atol=1e-6), (rule, kind, scale)


@pytest.mark.parametrize("rule", [*ROBUST, "learned"])
@pytest.mark.parametrize(("kind", "scale"), ATTACKS)
def test_robust_rules_and_learned_trust_hold_without_the_screen(
    rule: str, kind: str, scale: float
) -> None:
    honest = _honest_stack(k=4, p=30)
    stack = torch.cat([honest, _extreme(kind, scale, (1, 30))])
    mixed = _mix(rule, stack, ["a", "b", "c", "evil"], screen=False)
    assert bool(torch.isfinite(mixed).all())
    if rule == "learned" and scale < 1e30:
        return  # finite, unscreened: a constant shift is invisible to the loss (the screen's job)
    spread = float((honest - honest.mean(dim=0)).abs().max())
    assert float((mixed - honest.mean(dim=0)).abs().max()) <= 2 * spread, (rule, kind, scale)


def test_robust_rules_do_not_overflow_at_the_float32_limit() -> None:
    big = 3.4e38
    column = torch.tensor([[big], [big], [-1.0], [big]])
    assert coordinate_median(column).item() == float(column[0, 0])  # not (big + big) / 2 = inf
    assert trimmed_mean(column, trim_ratio=0.25).item() == pytest.approx(big, rel=1e-6)
    rows = torch.cat([torch.zeros(3, 4), torch.full((1, 4), big), torch.full((1, 4), -big)])
    scores = krum_scores(rows, byzantine=1)
    assert bool(torch.isfinite(scores).all())
    assert torch.equal(krum(rows, byzantine=1), torch.zeros(4))


def test_finite_or_own_keeps_own_rows_only_where_the_mix_broke() -> None:
    own = torch.zeros(3, 2)
    mixed = torch.tensor([[1.0, 2.0], [math.inf, 0.0], [math.nan, 1.0]])
    guarded, kept = finite_or_own(mixed, own)
    assert kept.tolist() == [False, True, True]
    assert guarded.tolist() == [[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]


# -- learned trust ------------------------------------------------------------------------------


def test_learn_trust_excludes_the_member_that_breaks_a_row_and_lowers_its_logit() -> None:
    # Two rows of three: row 0's member 2 makes the loss NaN whenever it has weight.
    def loss(weights: torch.Tensor) -> torch.Tensor:
        poisoned = (weights[:, 2] > 0) & torch.tensor([True, False])
        return (weights[:, 0] - 1.0).square() + torch.where(poisoned, math.nan, 0.0)

    logits = torch.zeros(2, 3)
    suspicion = torch.tensor([[-math.inf, 1.0, 5.0], [1.0, -math.inf, 5.0]])
    fit = learn_trust(logits, mixed_loss=loss, lr=1.0, steps=3, suspicion=suspicion)
    assert fit.excluded.tolist() == [[False, False, True], [False, False, False]]
    assert fit.members.tolist() == [[True, True, False], [True, True, True]]
    assert bool(torch.isfinite(fit.logits).all())
    assert float(fit.logits[0, 2]) <= float(fit.logits[0, :2].min()) - EXCLUDED_DROP + 1e-5
    # Without a suspicion order the bad row only holds still: finite, no exclusion.
    held = learn_trust(logits, mixed_loss=loss, lr=1.0, steps=3)
    assert not bool(held.excluded.any()) and bool(torch.isfinite(held.logits).all())


@pytest.mark.parametrize(("kind", "scale"), ATTACKS)
def test_trust_learner_weights_stay_finite_and_shut_out_an_unscreened_attacker(
    kind: str, scale: float
) -> None:
    _, loss = _linear_loss(30)
    learner = TrustLearner(MixingConfig(rule="learned", weight_floor=0.05))
    cohort = ["a", "b", "c", "evil"]
    stack = torch.cat([_honest_stack(k=4, p=30), _extreme(kind, scale, (1, 30))])
    for _ in range(3):
        weights = learner.learn(cohort, stack, loss)  # type: ignore[arg-type]
        assert bool(torch.isfinite(weights).all()) and bool((weights >= 0).all())
        assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    state = learner.state_dict()
    assert all(math.isfinite(v) for v in [state["self"], *state["peers"].values()])
    if scale > 1e30 or (kind == "extreme_mixed" and scale >= 1e10):
        # The mix overflows, or its gradient is absurd: excluded outright, despite the floor.
        assert learner.last_excluded == ["evil"] and float(weights[-1]) == 0.0
        assert state["peers"]["evil"] < min(state["self"], state["peers"]["a"]) - EXCLUDED_DROP
    elif kind == "extreme_mixed":  # the loss shows it: trust leaves it the floor's share only
        assert float(weights[-1]) <= 0.05 + 1e-6
    # A constant shift below overflow is invisible to a linear model's loss: the screen's job.


# -- the simulator ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Dataset:
    from fedtorrent.sim.run import load_for

    return load_for(SimConfig(data=DataConfig(dataset="digits")))


def _digits_run(
    dataset: Dataset, rule: str, attack: tuple[str, float] | None, *, plausibility: float = 10.0
) -> tuple[list[float], dict[str, int], bool]:
    from fedtorrent.sim.run import run_one

    config = SimConfig(
        data=DataConfig(dataset="digits", num_nodes=6),
        model=ModelConfig("logreg"),
        train=TrainConfig(batch_size=32, lr=0.1),
        mixing=MixingConfig(rule=rule, trim_ratio=0.2, byzantine=1, plausibility=plausibility),
        rounds=5,
        eval_every=5,
    )
    if attack is not None:
        config = replace(config, attack=attack[0], attack_scale=attack[1], attackers=1)
    outcome = run_one(config, dataset=dataset)
    finite = all(math.isfinite(a) for a in outcome.accuracies)
    return outcome.accuracies[:5], outcome.rejected, finite


@pytest.mark.parametrize("rule", MIXING_RULES)
def test_simulated_rule_keeps_its_clean_accuracy_against_every_extreme_attack(
    digits: Dataset, rule: str
) -> None:
    clean, clean_rejected, _ = _digits_run(digits, rule, None)
    assert clean_rejected == {}  # the screen never touches an honest run
    honest = sum(clean) / len(clean)
    for attack in ATTACKS:
        accuracies, rejected, finite = _digits_run(digits, rule, attack)
        mean = sum(accuracies) / len(accuracies)
        assert finite, (rule, attack)
        if rule == "none":
            assert accuracies == clean and rejected == {}
            continue
        assert rejected["implausible"] == 5 * 5, (rule, attack)  # 5 honest receivers, 5 rounds
        # 5 honest nodes of 6 learn from 5/6 of the data: within 3 points on 1,400 digits.
        assert abs(mean - honest) < 0.03, (rule, attack, mean, honest)


@pytest.mark.parametrize("rule", [*ROBUST, "learned"])
def test_simulated_robust_rules_and_learned_trust_stay_finite_without_the_screen(
    digits: Dataset, rule: str
) -> None:
    clean, _, _ = _digits_run(digits, rule, None, plausibility=0.0)
    for attack in (("extreme", 3e38), ("extreme_mixed", 3e38)):
        accuracies, rejected, finite = _digits_run(digits, rule, attack, plausibility=0.0)
        assert finite and "implausible" not in rejected and "unmixed" not in rejected
        assert abs(sum(accuracies) / 5 - sum(clean) / 5) < 0.03, (rule, attack)


def test_plausibility_is_validated_and_carried_in_the_torrent(tmp_path: Path) -> None:
    from fedtorrent.net.torrent import Session

    for bad in (-1.0, 0.5, 1.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="plausibility"):
            MixingConfig(plausibility=bad)
    base = Session(
        name="s", model=ModelConfig("logreg", {}), data=DataConfig(), train=TrainConfig(),
        mixing=MixingConfig(), rounds=2, cohort_size=2, state_sha256="0" * 64, state_size=10,
    )  # fmt: skip
    # The default is not written, so torrents made before the setting keep their info-hash...
    assert b"plausibility" not in base.to_info()[b"mixing"]
    assert Session.from_info(base.to_info()).mixing.plausibility == 10.0
    # ...and any other value is, and reads back.
    off = replace(base, mixing=MixingConfig(plausibility=0.0))
    assert Session.from_info(off.to_info()).mixing.plausibility == 0.0
    assert off.info_hash != base.info_hash


# -- peers on the in-memory twin ----------------------------------------------------------------


@pytest.mark.parametrize("plausibility", [10.0, 0.0])
def test_peers_survive_a_3e38_peer_and_log_no_nan(tmp_path: Path, plausibility: float) -> None:
    from test_peer import Swarm, make_torrent

    torrent = make_torrent(tmp_path, rule="learned", rounds=3, plausibility=plausibility)
    swarm = Swarm(torrent, tmp_path)
    peers = [
        swarm.peer(0),
        swarm.peer(1),
        swarm.peer(2, attack="extreme_mixed", attack_scale=3e38),
    ]
    assert swarm.run(peers) == ["done"] * 3
    for peer in peers[:2]:
        records = read_records(peer.out_dir / "metrics.jsonl")
        assert len(records) == 3
        for record in records:
            assert record["trust_weights"].get("peer-2", 0.0) == 0.0
            if plausibility > 0:
                assert record["rejected_from"] == {"peer-2": "implausible"}
                assert record["rejections"] == {"implausible": 1}
            else:
                assert record["excluded"] == ["peer-2"]
            assert all(math.isfinite(w) for w in record["trust_weights"].values())
        with sqlite3.connect(peer.ledger.path) as db:  # type: ignore[union-attr]
            weights = db.execute(
                "SELECT weight FROM entries WHERE direction = 'received' AND sender = 'peer-2'"
            ).fetchall()
        assert weights == [(0.0,)] * 3  # on record as received, never mixed
        checkpoint = json.loads((peer.out_dir / "checkpoint.json").read_text())
        assert checkpoint["round"] == 3
        assert bool(torch.isfinite(flatten(peer.current)).all())
        summary = json.loads((peer.out_dir / "summary.json").read_text())
        if plausibility > 0:
            assert summary["rejections"] == {"implausible": 3}


# -- a swarm of real peer processes --------------------------------------------------------------


def _mnist_swarm(tmp_path: Path, name: str, **attack: object) -> dict[str, object]:
    from fedtorrent.cli.net import create
    from fedtorrent.node.swarm import SwarmConfig, run_swarm

    torrent = tmp_path / f"{name}.torrent"
    create(output=torrent, dataset="mnist", model="logreg", nodes=4, cohort=3, rounds=3,
           mixing="learned", steps=60)  # fmt: skip
    config = SwarmConfig(torrent=torrent, out=tmp_path / name, peers=4, exchange_timeout=20,
                         processes=2, **attack)  # type: ignore[arg-type]  # fmt: skip
    summary = run_swarm(config, timeout=90, plots=False)
    assert summary["finished"] == 4, summary["per_peer"]
    return summary


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_live_swarm_shrugs_off_a_3e38_attacker(tmp_path: Path) -> None:
    from fedtorrent.node.swarm import peer_folder

    require_dataset("mnist")
    clean = _mnist_swarm(tmp_path, "clean")
    attacked = _mnist_swarm(tmp_path, "attacked", attackers=1, attack="extreme", attack_scale=3e38)
    security = attacked["security"]
    assert isinstance(security, dict) and security["attackers"] == ["peer-3"]
    assert security["weight_to_attackers"] == 0.0
    assert security["rejections"]["implausible"] == 3 * 3  # 3 honest peers, 3 rounds
    honest_clean = [p["test_accuracy"] for p in clean["per_peer"][:3]]  # type: ignore[index]
    for index in range(3):
        records = read_records(peer_folder(tmp_path / "attacked", index) / "metrics.jsonl")
        assert [r["round"] for r in records] == [1, 2, 3]
        assert all(r["rejected_from"] == {"peer-3": "implausible"} for r in records)
        accuracy = records[-1]["test_accuracy"]
        assert accuracy > 0.85 and accuracy > honest_clean[index] - 0.02, (index, accuracy)
