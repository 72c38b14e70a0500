"""Example-level DP-SGD: accounting against Opacus, clipping, Poisson batches, simulator, peers."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import run_cli
from fedtorrent.config import (
    DataConfig,
    MixingConfig,
    ModelConfig,
    PrivacyConfig,
    SimConfig,
    TrainConfig,
)
from fedtorrent.errors import ConfigError, PrivacyError
from fedtorrent.metrics.records import read_json, read_records
from fedtorrent.net.torrent import load_torrent, save_torrent
from fedtorrent.privacy import ExampleDP, ExamplePrivacy, example_dp
from fedtorrent.privacy.dp_sgd import (
    _per_example_chunks,
    clip_and_sum,
    noisy_gradient,
    poisson_batches,
    private_step,
)
from fedtorrent.training import train_local

pytestmark = pytest.mark.timeout(120)
DELTA = 1e-5
EXAMPLE = PrivacyConfig(clip=1.0, noise_multiplier=1.1, unit="example")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- accounting -----------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_epsilon_equals_opacus_for_the_same_rate_noise_and_steps(mechanism: str) -> None:
    from opacus.accountants import PRVAccountant, RDPAccountant

    dp = ExampleDP(clip=1.0, noise_multiplier=1.1, sample_rate=0.02, steps=50)
    private = ExamplePrivacy(dp, delta=DELTA, mechanism=mechanism)
    projected = private.next_epsilon()
    epsilons = [private.charge_round() for _ in range(3)]
    assert projected == pytest.approx(epsilons[0])
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    opacus = RDPAccountant() if mechanism == "rdp" else PRVAccountant()
    for _ in range(150):
        opacus.step(noise_multiplier=1.1, sample_rate=0.02)
    assert private.epsilon == pytest.approx(opacus.get_epsilon(delta=DELTA), rel=1e-6)


def test_example_dp_derives_rate_steps_and_noise_for_the_target() -> None:
    config = PrivacyConfig(clip=0.5, target_epsilon=1.0, unit="example")
    dp = example_dp(config, TrainConfig(batch_size=50, epochs=2), examples=1000, rounds=4)
    assert (dp.clip, dp.sample_rate, dp.steps) == (0.5, 0.05, 40)
    private = ExamplePrivacy(dp, delta=DELTA)
    final = [private.charge_round() for _ in range(4)][-1]
    assert 0.97 <= final <= 1.0 + 0.01  # Opacus's search tolerance
    fixed = example_dp(EXAMPLE, TrainConfig(batch_size=64, steps=7), examples=32, rounds=3)
    assert (fixed.noise_multiplier, fixed.sample_rate, fixed.steps) == (1.1, 1.0, 7)
    for bad in (
        lambda: example_dp(PrivacyConfig(clip=1.0, noise_multiplier=1.0), TrainConfig(),
                           examples=10, rounds=1),
        lambda: example_dp(EXAMPLE, TrainConfig(), examples=0, rounds=1),
        lambda: example_dp(EXAMPLE, TrainConfig(epochs=0), examples=10, rounds=1),
    ):  # fmt: skip
        with pytest.raises(PrivacyError):
            bad()


def test_privacy_state_round_trips_and_refuses_what_does_not_fit() -> None:
    dp = ExampleDP(clip=1.0, noise_multiplier=1.1, sample_rate=0.1, steps=5)
    private = ExamplePrivacy(dp, delta=DELTA, noise_seed=12345)
    private.charge_round()
    state = private.state_dict()
    again = ExamplePrivacy(dp, delta=DELTA, noise_seed=1)
    again.load_state_dict(state)
    assert again.epsilon == private.epsilon and again.accountant.history == [(1.1, 0.1, 5)]
    assert torch.equal(
        torch.randn(3, generator=again.noise_generator(2)),
        torch.randn(3, generator=private.noise_generator(2)),
    )
    other = ExamplePrivacy(dataclasses.replace(dp, steps=6), delta=DELTA)
    for bad, target in (
        (state, other),
        ({**state, "unit": "node"}, again),
        ({**state, "noise_seed": -1}, again),
        ({**state, "dp": {"clip": 1.0}}, again),
    ):
        with pytest.raises(PrivacyError):
            target.load_state_dict(bad)


# --- clipping and noise ---------------------------------------------------------------------


def test_clipping_bounds_each_examples_influence() -> None:
    per_example = [torch.tensor([[3.0, 4.0], [1e6, 0.0], [0.0, 0.1]]), torch.zeros(3, 1)]
    summed = clip_and_sum(per_example, clip=1.0)
    # The closed form: 5 -> 1 (scaled by 1/5), 1e6 -> 1, 0.1 stays.
    assert torch.allclose(summed[0], torch.tensor([0.6 + 1.0 + 0.0, 0.8 + 0.0 + 0.1]))
    assert float(summed[0].norm()) <= 1.0 * 3
    # The norm is joint over parameters: (0.6, 0.8) in one tensor and 0 in the other.
    joint = clip_and_sum([torch.tensor([[0.6]]), torch.tensor([[0.8]])], clip=0.5)
    assert torch.allclose(torch.cat(joint), torch.tensor([0.3, 0.4]))


def test_one_step_moves_at_most_lr_clip_over_the_batch_whatever_the_example() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    huge = torch.full((1, 5), 1e4)
    dp = ExampleDP(clip=0.5, noise_multiplier=0.3, sample_rate=0.5, steps=1)
    lr, expected = 0.7, dp.expected_batch(16)
    results = []
    for xs, ys in ((x, y), (torch.cat([x, huge]), torch.cat([y, torch.tensor([2])]))):
        torch.manual_seed(1)
        model = nn.Linear(5, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        private_step(
            model, xs, ys, loss=F.cross_entropy, optimizer=optimizer, dp=dp,
            expected_batch=expected, generator=gen(5),  # the same noise for both
        )  # fmt: skip
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    moved = float((results[0] - results[1]).norm())
    assert 0 < moved <= lr * dp.clip / expected + 1e-6


def test_noise_has_std_sigma_clip_over_the_expected_batch() -> None:
    dp = ExampleDP(clip=2.0, noise_multiplier=1.5, sample_rate=0.1, steps=1)
    (noise,) = noisy_gradient([], [torch.zeros(20_000)], dp=dp, expected_batch=4.0, generator=gen())
    assert float(noise.std()) == pytest.approx(1.5 * 2.0 / 4.0, rel=0.03)
    assert abs(float(noise.mean())) < 0.02


def test_per_example_gradients_match_autograd_one_example_at_a_time() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 1))
    x, y = torch.randn(5, 4), torch.randn(5, 1)
    names = [name for name, _ in model.named_parameters()]
    losses: list[torch.Tensor] = []
    (chunk,) = _per_example_chunks(model, F.mse_loss, x, y, names=names, losses=losses)
    for i in range(5):
        model.zero_grad()
        F.mse_loss(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, grad in zip(names, chunk, strict=True):
            assert torch.allclose(grad[i], dict(model.named_parameters())[name].grad, atol=1e-6)
    assert torch.allclose(torch.cat(losses), ((model(x) - y) ** 2).reshape(-1), atol=1e-6)


def test_poisson_batches_have_the_right_mean_and_vary() -> None:
    dp = ExampleDP(clip=1.0, noise_multiplier=1.0, sample_rate=0.05, steps=2000)
    batches = poisson_batches(1000, dp, gen(3))
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert len(batches) == 2000 and float(sizes.mean()) == pytest.approx(50, abs=0.6)
    assert float(sizes.var()) == pytest.approx(1000 * 0.05 * 0.95, rel=0.15)
    counts = torch.bincount(torch.cat(batches), minlength=1000).to(torch.float64)
    assert float(counts.mean()) == pytest.approx(100, abs=1.5)  # every example equally likely
    assert [b.tolist() for b in poisson_batches(1000, dp, gen(3))[:3]] == [
        b.tolist() for b in batches[:3]
    ]


def test_train_local_runs_dp_sgd_and_an_empty_batch_still_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x, y = torch.randn(3, 4), torch.randint(0, 2, (3,))
    before = [p.detach().clone() for p in model.parameters()]
    dp = ExampleDP(clip=1.0, noise_multiplier=1.0, sample_rate=1e-9, steps=2)  # always empty
    loss = train_local(model, x, y, TrainConfig(lr=0.1), generator=gen(), dp=dp, noise=gen(1))
    assert math.isnan(loss)  # no example was seen
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(ConfigError, match="noise generator"):
        train_local(model, x, y, TrainConfig(), dp=dp)
    with pytest.raises(PrivacyError, match="BatchNorm1d"):
        train_local(nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2)), x, y, TrainConfig(),
                    dp=dp, noise=gen())  # fmt: skip


def test_a_task_with_its_own_train_step_is_refused() -> None:
    from fedtorrent.task import NodeData, Task, default_train_step
    from fedtorrent.task.drive import train_task

    task = Task(
        model=lambda: nn.Linear(4, 2),
        data=lambda node, n: NodeData(train=(torch.randn(8, 4), torch.randint(0, 2, (8,)))),
        train_step=default_train_step,
    )
    x, y = task.node_data(0, 1).tensors("train")
    dp = ExampleDP(clip=1.0, noise_multiplier=1.0, sample_rate=0.5, steps=2)
    with pytest.raises(ConfigError, match=r"cannot run Task\.train_step"):
        train_task(task, task.make_model(), x, y, TrainConfig(), generator=gen(), round=0,
                   dp=dp, noise=gen())  # fmt: skip
    plain = dataclasses.replace(task, train_step=None)
    loss = train_task(plain, plain.make_model(), x, y, TrainConfig(), generator=gen(), round=0,
                      dp=dp, noise=gen())  # fmt: skip
    assert math.isfinite(loss)


# --- the simulator --------------------------------------------------------------------------


def _digits(rounds: int = 6, **privacy: object) -> SimConfig:
    return SimConfig(
        data=DataConfig(dataset="digits", num_nodes=3, val_fraction=0.0),
        model=ModelConfig(name="logreg"),
        train=TrainConfig(batch_size=32, lr=0.5),
        mixing=MixingConfig(rule="fixed"),
        rounds=rounds,
        round_schedule="constant",
        privacy=PrivacyConfig(clip=1.0, unit="example", **privacy),  # type: ignore[arg-type]
    )


def test_simulator_trains_with_example_dp_and_reports_epsilon_per_round(tmp_path: Path) -> None:
    from fedtorrent.sim.run import simulate

    runs, summary = simulate(_digits(target_epsilon=3.0), out_dir=tmp_path, plots=False,
                             progress=False)  # fmt: skip
    (run,) = runs
    assert run.engine_path == "linear"
    assert min(run.accuracies) > 0.75
    records = read_records(tmp_path / "rounds.jsonl")
    per_round = [r["epsilon"] for r in records if r["node"] == 0]
    assert len(per_round) == 6 and per_round == sorted(per_round) and per_round[0] > 0
    assert 2.9 <= per_round[-1] <= 3.0 + 0.01
    assert run.security is not None and run.security["epsilon"] == pytest.approx(per_round[-1])
    assert summary["by_mixing"]["fixed"]["security"]["epsilon"] == pytest.approx(per_round[-1])


def test_linear_path_and_per_node_loop_give_the_same_dp_sgd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedtorrent.data.datasets import load_dataset
    from fedtorrent.sim import run as sim_run
    from fedtorrent.sim.engine import FunctionalBackend

    config = _digits(rounds=2, noise_multiplier=1.0)
    dataset = load_dataset("digits", progress=False)
    linear = sim_run.run_one(config, dataset=dataset, keep_states=True)

    def functional(model: nn.Module, **_: object) -> FunctionalBackend:
        return FunctionalBackend(
            model, {k: v.detach().clone() for k, v in model.state_dict().items()}
        )

    monkeypatch.setattr(sim_run, "make_backend", functional)  # not linear: the per-node loop
    loop = sim_run.run_one(config, dataset=dataset, keep_states=True)
    assert (linear.engine_path, loop.engine_path) == ("linear", "loop")
    assert linear.states is not None and loop.states is not None
    for a, b in zip(linear.states, loop.states, strict=True):
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-5)


# --- the command line and the torrent -------------------------------------------------------


def test_cli_simulates_example_dp_and_refuses_bad_combinations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    common = ["simulate", "--dataset", "digits", "--nodes", "2", "--rounds", "2", "--no-plots",
              "--no-progress", "--batch-size", "32", "--lr", "0.5",
              "--mixing", "fixed"]  # fmt: skip
    ok = [*common, "--out", str(out), "--dp-unit", "example", "--dp-clip", "1", "--dp-epsilon", "1"]
    assert run_cli(monkeypatch, *ok) == 0
    summary = read_json(out / "summary.json")
    assert 0.9 <= summary["by_mixing"]["fixed"]["security"]["epsilon"] <= 1.01
    capsys.readouterr()
    assert run_cli(monkeypatch, "create", "--help") == 0
    assert "--dp-unit" in capsys.readouterr().out
    for bad, message in (
        (["--dp-unit", "example"], "need --dp-clip"),
        (["--dp-unit", "batch", "--dp-clip", "1", "--dp-noise", "1"], "dp unit must be one of"),
    ):
        assert run_cli(monkeypatch, *common, "--out", str(tmp_path / "bad"), *bad) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err


def test_torrent_carries_the_unit(tmp_path: Path) -> None:
    from test_peer import make_torrent

    path = make_torrent(tmp_path)
    torrent = load_torrent(path)
    session = dataclasses.replace(torrent.session, privacy=EXAMPLE)
    save_torrent(dataclasses.replace(torrent, session=session), path)
    again = load_torrent(path)
    assert again.session.privacy == EXAMPLE and again.info_hash != torrent.info_hash


# --- real peers -----------------------------------------------------------------------------


@pytest.mark.slow
def test_peers_train_with_dp_sgd_and_record_epsilon_per_round(tmp_path: Path) -> None:
    from test_peer import Swarm, make_torrent

    path = make_torrent(tmp_path, nodes=3, rounds=2)
    torrent = load_torrent(path)
    train = dataclasses.replace(torrent.session.train, lr=0.5)  # clipped gradients are small
    session = dataclasses.replace(torrent.session, privacy=EXAMPLE, train=train)
    save_torrent(dataclasses.replace(torrent, session=session), path)
    swarm = Swarm(path, tmp_path)
    peers = [swarm.peer(i) for i in range(3)]
    assert swarm.run(peers) == ["done"] * 3
    for peer in peers:
        assert isinstance(peer.private, ExamplePrivacy)
        dp = peer.private.dp
        assert dp.sample_rate == pytest.approx(32 / len(peer.data.y_train))
        expected = ExamplePrivacy(dp, delta=DELTA)
        epsilons = [expected.charge_round() for _ in range(2)]
        records = read_records(peer.out_dir / "metrics.jsonl")
        assert [r["epsilon"] for r in records] == pytest.approx(epsilons)
        assert read_json(peer.out_dir / "summary.json")["security"]["epsilon"] == pytest.approx(
            epsilons[-1]
        )
        assert records[-1]["test_accuracy"] > 0.5
