"""The vectorized engine against plain per-node training, and the run folder it writes."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedtorrent.config import (
    DataConfig,
    MixingConfig,
    ModelConfig,
    SimConfig,
    TopologyConfig,
    TrainConfig,
)
from fedtorrent.mixing.rules import mix_stack
from fedtorrent.models import build_model
from fedtorrent.sim.engine import (
    Engine,
    FunctionalBackend,
    LinearBackend,
    make_backend,
    node_data,
)
from fedtorrent.sim.topology import Topology
from fedtorrent.state import flatten

SHAPE = (1, 3, 3)
CLASSES = 4


def _synthetic(counts: list[int], *, seed: int = 0, val: int = 8) -> tuple[object, ...]:
    """Blobs in 9 dimensions, split into nodes of the given training sizes."""
    rng = np.random.default_rng(seed)
    total = sum(counts) + val * len(counts)
    centers = rng.normal(size=(CLASSES, 9)) * 2
    y = rng.integers(0, CLASSES, size=total + 50)
    x = (centers[y] + rng.normal(size=(total + 50, 9))).astype(np.float32).reshape(-1, *SHAPE)
    splits, start = [], 0
    for count in counts:
        train = np.arange(start, start + count)
        splits.append((train, np.arange(start + count, start + count + val)))
        start += count + val
    return x[:total], y[:total], x[total:], y[total:], splits


def _engine(
    counts: list[int],
    *,
    model: str = "logreg",
    train: TrainConfig | None = None,
    mixing: MixingConfig | None = None,
    topology: TopologyConfig | None = None,
    seed: int = 0,
    share: object = None,
) -> tuple[Engine, nn.Module]:
    x, y, xt, yt, splits = _synthetic(counts)
    data = node_data(x_train=x, y_train=y, x_test=xt, y_test=yt, splits=splits, num_classes=CLASSES)
    torch.manual_seed(seed)
    net = build_model(model, input_shape=SHAPE, num_classes=CLASSES)
    engine = Engine(
        backend=make_backend(net, input_shape=SHAPE),
        data=data,
        train=train or TrainConfig(batch_size=4, lr=0.1),
        mixing=mixing or MixingConfig(rule="fixed"),
        topology=Topology(topology or TopologyConfig(), num_nodes=len(counts), seed=seed),
        init=flatten(net.state_dict()),
        seed=seed,
        share=share,  # type: ignore[arg-type]
    )
    return engine, net


def test_linear_fast_path_matches_autograd_through_the_module() -> None:
    torch.manual_seed(0)
    net = build_model("logreg", input_shape=SHAPE, num_classes=CLASSES)
    like = {k: v.detach() for k, v in net.state_dict().items()}
    fast = make_backend(net, input_shape=SHAPE)
    slow = FunctionalBackend(net, like)
    assert isinstance(fast, LinearBackend)
    params = torch.randn(3, fast.num_params)
    x = torch.randn(3, 7, *SHAPE)
    y = torch.randint(0, CLASSES, (3, 7))
    weight = torch.rand(3, 7)
    weight /= weight.sum(dim=1, keepdim=True)
    for w in (None, weight):
        expected = slow.grad(params, x, y, w)
        assert torch.allclose(
            fast.grad(params, fast.prepare(x.flatten(0, 1)).view(3, 7, -1), y, w),
            expected,
            atol=1e-5,
        )
    flat_x = fast.prepare(x.flatten(0, 1)).view(3, 7, -1)
    assert torch.allclose(fast.losses(params, flat_x, y), slow.losses(params, x, y), atol=1e-5)
    shared = torch.randn(5, *SHAPE)
    assert torch.allclose(
        fast.logits(params, fast.prepare(shared)), slow.logits(params, shared), atol=1e-5
    )


def test_only_an_affine_model_takes_the_fast_path() -> None:
    torch.manual_seed(0)
    assert isinstance(
        make_backend(build_model("mlp", input_shape=SHAPE, num_classes=3), input_shape=SHAPE),
        FunctionalBackend,
    )
    relu = nn.Sequential(nn.Flatten(), nn.Linear(9, 3), nn.ReLU())
    assert isinstance(make_backend(relu, input_shape=SHAPE), FunctionalBackend)


@pytest.mark.parametrize(
    ("model", "train"),
    [
        ("logreg", TrainConfig(epochs=2, batch_size=64, lr=0.3, momentum=0.9, weight_decay=0.01)),
        ("mlp", TrainConfig(epochs=2, batch_size=64, lr=0.01, optimizer="adam")),
        ("logreg", TrainConfig(steps=3, batch_size=64, lr=0.5, lr_schedule="cosine")),
    ],
)
def test_vectorized_training_matches_a_plain_loop(model: str, train: TrainConfig) -> None:
    """Full-batch steps do not depend on batch order, so each node must match its own module."""
    counts = [5, 12, 9]  # unbalanced: nodes differ in size
    engine, _ = _engine(counts, model=model, train=train, mixing=MixingConfig(rule="none"))
    start = engine.params.clone()
    engine.train_round(0)
    x, y = engine.data.x_train, engine.data.y_train
    for node, count in enumerate(counts):
        module = build_model(model, input_shape=SHAPE, num_classes=CLASSES)
        module.load_state_dict({k: v.clone() for k, v in engine.node_state(0).items()})
        with torch.no_grad():
            for p, v in zip(module.state_dict().values(), _views(start[node], module), strict=True):
                p.copy_(v)
        optimizer = (
            torch.optim.Adam(module.parameters(), lr=train.lr)
            if train.optimizer == "adam"
            else torch.optim.SGD(
                module.parameters(),
                lr=train.lr,
                momentum=train.momentum,
                weight_decay=train.weight_decay,
            )
        )
        rows = engine.data.train_index[node, :count]
        total = train.steps or train.epochs
        for step in range(total):
            if train.lr_schedule == "cosine":
                for group in optimizer.param_groups:
                    group["lr"] = train.lr * 0.5 * (1 + np.cos(np.pi * step / total))
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(x[rows]), y[rows]).backward()
            optimizer.step()
        assert torch.allclose(engine.params[node], flatten(module.state_dict()), atol=1e-5), node


def _views(row: torch.Tensor, module: nn.Module) -> list[torch.Tensor]:
    from fedtorrent.mixing.trust import flat_views

    views = flat_views(row, module.state_dict())
    return [views[k] for k in module.state_dict()]


def test_none_leaves_models_unchanged_and_fixed_averages() -> None:
    engine, _ = _engine([10, 10, 10, 10], mixing=MixingConfig(rule="none"))
    engine.params = torch.randn_like(engine.params)
    before = engine.params.clone()
    weights = engine.mix_round(0)
    assert torch.equal(engine.params, before)
    assert weights is not None and torch.equal(weights, torch.eye(4))

    engine, _ = _engine([10, 10, 10, 10], mixing=MixingConfig(rule="fixed"))
    engine.params = torch.randn_like(engine.params)
    mean = engine.params.mean(dim=0)
    weights = engine.mix_round(0)
    assert torch.allclose(engine.params, mean.expand_as(engine.params), atol=1e-6)
    assert weights is not None and torch.allclose(weights.sum(dim=1), torch.ones(4))


def test_small_cohorts_in_a_big_swarm_mix_like_the_dense_product() -> None:
    engine, _ = _engine(
        [3] * 200,
        mixing=MixingConfig(rule="fixed"),
        topology=TopologyConfig(kind="random_cohort", degree=3),
    )
    engine.params = torch.randn_like(engine.params)
    before = engine.params.clone()
    weights = engine.mix_round(2)
    assert weights is not None and int((weights[0] > 0).sum()) == 4
    assert torch.allclose(engine.params, weights @ before, atol=1e-5)


def test_same_seed_gives_identical_results() -> None:
    def final(seed: int) -> torch.Tensor:
        engine, _ = _engine(
            [9, 14, 11, 6, 10],
            mixing=MixingConfig(rule="learned", trust_steps=3),
            topology=TopologyConfig(kind="random_cohort", degree=2),
            seed=seed,
        )
        for r in range(3):
            engine.run_round(r)
        return torch.cat([engine.params.flatten(), engine.trust_logits.flatten()])

    assert torch.equal(final(3), final(3))
    assert not torch.equal(final(3), final(4))


def test_learned_trust_shuns_a_node_that_shares_garbage() -> None:
    def share(params: torch.Tensor, round_index: int, **_: torch.Tensor) -> torch.Tensor:
        out = params.clone()
        out[3] = (
            torch.randn(params.shape[1], generator=torch.Generator().manual_seed(round_index)) * 10
        )
        return out

    engine, _ = _engine(
        [30] * 5,
        mixing=MixingConfig(rule="learned", trust_lr=5.0, trust_steps=10),
        share=share,
    )
    for r in range(4):
        weights = engine.run_round(r)
    assert weights is not None
    honest = [0, 1, 2, 4]
    assert float(weights[honest, 3].max()) < 0.05, weights
    assert torch.allclose(weights.sum(dim=1), torch.ones(5), atol=1e-5)
    # The garbage node still mixes its own true parameters for itself.
    assert bool(torch.isfinite(engine.params).all())


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum"])
def test_robust_rules_in_the_engine_match_the_single_node_form(rule: str) -> None:
    engine, _ = _engine(
        [10] * 7,
        mixing=MixingConfig(rule=rule, trim_ratio=0.25, byzantine=1),
        topology=TopologyConfig(kind="erdos_renyi", edge_prob=0.5),
    )
    engine.params = torch.randn_like(engine.params)
    before = engine.params.clone()
    adjacency = engine.topology.cohorts(0)
    engine.mix_round(0)
    for node in range(7):
        members = [node, *adjacency[node].nonzero().squeeze(1).tolist()]
        expected = mix_stack(before[members], config=engine.mixing)
        assert torch.allclose(engine.params[node], expected, atol=1e-6), node


def test_evaluation_matches_each_module() -> None:
    engine, _ = _engine([20, 20, 20], model="mlp")
    engine.run_round(0)
    evaluation = engine.evaluate(keep_predictions=True)
    for node in range(3):
        module = build_model("mlp", input_shape=SHAPE, num_classes=CLASSES)
        module.load_state_dict(engine.node_state(node))
        module.eval()
        with torch.no_grad():
            logits = module(engine.data.x_test)
        assert torch.equal(evaluation.predictions[node], logits.argmax(dim=1))  # type: ignore[index]
        loss = nn.functional.cross_entropy(logits, engine.data.y_test)
        assert abs(float(evaluation.loss[node]) - float(loss)) < 1e-5
    assert int(evaluation.confusion.sum()) == 3 * len(engine.data.y_test)


def _digits_config(**changes: object) -> SimConfig:
    config = SimConfig(
        data=DataConfig(dataset="digits", num_nodes=4),
        model=ModelConfig(name="logreg"),
        train=TrainConfig(batch_size=32, lr=0.1),
        rounds=3,
    )
    return replace(config, **changes)  # type: ignore[arg-type]


def test_simulate_writes_records_summary_and_plots(tmp_path: Path) -> None:
    from fedtorrent.metrics.records import read_records
    from fedtorrent.sim.run import simulate

    configs = [
        replace(_digits_config(), mixing=MixingConfig(rule=rule)).with_seed(seed)
        for rule in ("fixed", "learned")
        for seed in (0, 1)
    ]
    configs = [replace(c, data=replace(c.data, split="noniid")) for c in configs]
    outcomes, summary = simulate(configs, out_dir=tmp_path)
    rounds = read_records(tmp_path / "rounds.jsonl")
    assert len(rounds) == 2 * 2 * 3 * 4
    assert {r["mixing"] for r in rounds} == {"fixed", "learned"}
    final = read_records(tmp_path / "final.jsonl")
    assert len(final) == 16 and np.array(final[0]["confusion"]).shape == (10, 10)
    assert (tmp_path / "rounds.csv").read_text().splitlines()[0].startswith("mixing,seed,round")
    trust = read_records(tmp_path / "trust.jsonl")
    assert any(t["mixing"] == "learned" and t["round"] == 1 for t in trust)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert set(saved["by_mixing"]) == {"fixed", "learned"}
    assert 0 < saved["by_mixing"]["fixed"]["accuracy_mean"] <= 1
    assert summary["by_mixing"]["fixed"]["runs"] == 2
    for name in ("accuracy", "own_accuracy", "trust_learned", "confusion_fixed"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
    assert outcomes[0].accuracies == [r["accuracy"] for r in final[:4]]


def test_cli_simulate_prints_the_summary(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedtorrent.cli import app

    result = CliRunner().invoke(
        app,
        [
            "simulate", "--dataset", "digits", "--nodes", "3", "--rounds", "2",
            "--mixing", "none", "--mixing", "fixed", "--seed", "1", "--out", str(tmp_path),
            "--no-plots", "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "mean %" in result.output and "fixed" in result.output
    assert (tmp_path / "summary.json").exists() and not (tmp_path / "plots").exists()


def test_reproduce_pipeline_on_digits(tmp_path: Path) -> None:
    from fedtorrent.sim.reproduce import ReproducePlan, render_report, reproduce

    plan = ReproducePlan(
        seeds=(0,),
        rounds=2,
        datasets=("digits",),
        splits=("iid",),
        sweep_dataset="digits",
        sweep_nodes=(2, 4),
        sweep_seeds=(0,),
        centralized=False,
    )
    report = reproduce(plan, out=tmp_path)
    text = report.read_text()
    assert "Accuracy against the number of nodes" in text
    assert (tmp_path / "plots" / "nodes.png").exists()
    assert (tmp_path / "runs" / "digits-iid" / "plots" / "accuracy.png").exists()
    record = json.loads((tmp_path / "reproduce.json").read_text())
    assert set(record["sweep"]["points"]) == {"none", "fixed", "learned"}
    # The verdicts compare the best sharing mode with the paper.
    row = {"accuracy_mean": 0.85, "accuracy_std": 0.001, "own_accuracy_mean": 0.85,
           "own_accuracy_std": 0.0, "accuracy_std_seeds": 0.0}  # fmt: skip
    record["plan"]["datasets"] = ["mnist", "fashion-mnist"]
    record["tables"] = {
        "mnist": {"iid": {"none": row, "fixed": row, "learned": row}},
        "fashion-mnist": {
            "iid": {
                "none": {**row, "accuracy_mean": 0.830},
                "fixed": {**row, "accuracy_mean": 0.842},
                "learned": {**row, "accuracy_mean": 0.843},
            }
        },
    }
    rendered = render_report(record)
    assert "-7.00 ✗" in rendered  # MNIST 85.0 vs 92.0
    assert "+0.10 ✓" in rendered  # learned 84.3 vs 84.2
    assert "**holds**" in rendered
    assert "Seed by seed" not in rendered  # no per-seed values: no paired line
    iid = record["tables"]["fashion-mnist"]["iid"]
    for rule, values in (("fixed", [0.842, 0.840, 0.844]), ("learned", [0.843, 0.841, 0.845])):
        iid[rule] |= {"seeds": [0, 1, 2], "accuracy_per_seed": values}
    rendered = render_report(record)
    assert "learned - fixed is +0.100 points, 95% interval [+0.100, +0.100]" in rendered
    assert "it is not 0" in rendered


@pytest.mark.parametrize("counts", [[8, 8, 8, 8, 8], [3, 12, 7, 9, 5]])
def test_splitting_a_step_into_node_groups_changes_nothing(
    counts: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedtorrent.sim.engine as engine_module

    train = TrainConfig(epochs=2, batch_size=4, lr=0.1, momentum=0.9, lr_schedule="cosine")

    def trained() -> torch.Tensor:
        engine, _ = _engine(counts, train=train, mixing=MixingConfig(rule="none"))
        engine.train_round(0)
        return engine.params

    whole = trained()
    monkeypatch.setattr(engine_module, "_BATCH_FLOATS", 4 * 9 * 2)  # two nodes per group
    assert torch.allclose(trained(), whole, atol=1e-6)


def test_row_by_row_and_vmapped_forward_agree() -> None:
    torch.manual_seed(0)
    net = build_model("mlp", input_shape=SHAPE, num_classes=CLASSES, hidden=5)
    like = {k: v.detach() for k, v in net.state_dict().items()}
    batched, looped = FunctionalBackend(net, like), FunctionalBackend(net, like, vectorize=False)
    assert batched.vectorize and not looped.vectorize
    conv = build_model("cnn", input_shape=(1, 8, 8), num_classes=3)
    assert not FunctionalBackend(conv, dict(conv.state_dict())).vectorize
    params = torch.randn(3, batched.num_params)
    x, y = torch.randn(3, 6, *SHAPE), torch.randint(0, CLASSES, (3, 6))
    weight = torch.softmax(torch.randn(3, 6), dim=1)
    for w in (None, weight):
        assert torch.allclose(
            batched.grad(params, x, y, w), looped.grad(params, x, y, w), atol=1e-5
        )
    assert torch.allclose(batched.losses(params, x, y), looped.losses(params, x, y), atol=1e-5)
    shared = torch.randn(4, *SHAPE)
    assert torch.allclose(batched.logits(params, shared), looped.logits(params, shared), atol=1e-5)


def test_round_lr_scale_is_cosine_over_the_run_and_shared_with_peers() -> None:
    import math

    from fedtorrent.errors import ConfigError
    from fedtorrent.sim import run
    from fedtorrent.training import round_lr_scale

    assert run.round_lr_scale is round_lr_scale  # one schedule for the simulator and the peers
    assert [round_lr_scale("constant", r, 4) for r in range(6)] == [1.0] * 6
    cosine = [round_lr_scale("cosine", r, 4) for r in range(4)]
    assert cosine == pytest.approx([1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2])
    assert round_lr_scale("cosine", 9, 4) == cosine[-1] > 0  # past the last round: held there
    assert round_lr_scale("cosine", 0, 1) == 1.0
    for bad in (("step", 0, 4), ("cosine", -1, 4), ("cosine", 0, 0)):
        with pytest.raises(ConfigError):
            round_lr_scale(*bad)


def test_the_cnn_on_the_engine_trains_each_node_as_its_own_module_would() -> None:
    """The built-in CNN (convolutions, pooling): the engine's rows match separate modules."""
    shape, counts = (1, 8, 8), [6, 9, 7]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), *shape, generator=generator).numpy()
    y = torch.randint(0, CLASSES, (sum(counts),), generator=generator).numpy()
    bounds = np.cumsum([0, *counts])
    splits = [(np.arange(a, b), np.arange(0)) for a, b in itertools.pairwise(bounds)]
    data = node_data(x_train=x, y_train=y, x_test=x[:5], y_test=y[:5], splits=splits,
                     num_classes=CLASSES)  # fmt: skip
    torch.manual_seed(0)
    net = build_model("cnn", input_shape=shape, num_classes=CLASSES, hidden=16)
    train = TrainConfig(epochs=3, batch_size=16, lr=0.1, momentum=0.9)  # full batches
    engine = Engine(
        backend=make_backend(net, input_shape=shape), data=data, train=train,
        mixing=MixingConfig(rule="none"), topology=Topology(TopologyConfig(), num_nodes=3, seed=0),
        init=flatten(net.state_dict()), seed=0,
    )  # fmt: skip
    engine.train_round(0)
    for node, (rows, _) in enumerate(splits):
        module = build_model("cnn", input_shape=shape, num_classes=CLASSES, hidden=16)
        module.load_state_dict(net.state_dict())
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
        inputs, targets = torch.from_numpy(x[rows]), torch.from_numpy(y[rows])
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(inputs), targets).backward()
            optimizer.step()
        assert torch.allclose(engine.params[node], flatten(module.state_dict()), atol=1e-5), node


def test_identical_nodes_are_scored_once_with_the_same_result_as_each_alone() -> None:
    engine, _ = _engine([10, 10, 10, 10], mixing=MixingConfig(rule="fixed"))
    engine.run_round(0)  # complete graph, fixed weights: every node holds the same model
    assert bool((engine.params == engine.params[:1]).all())
    x, y = engine._x_test, engine.data.y_test
    each = engine._evaluate(x, y, True, engine.params)  # every row scored on its own
    once = engine.evaluate(keep_predictions=True)
    assert torch.equal(once.loss, each.loss) and torch.equal(once.confusion, each.confusion)
    assert once.predictions is not None and each.predictions is not None
    assert torch.equal(once.predictions, each.predictions)
    engine.params[2, 0] += 1.0  # one node differs: all are scored
    assert not torch.equal(engine.evaluate().loss[2], engine.evaluate().loss[0])
