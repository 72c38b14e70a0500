"""Learned trust under example-level DP: the trust fit as DP-SGD on the logits (``TrustDP``).

The toy task is logistic regression on Gaussian blobs, scored by the simulator's own
``LinearBackend`` (all receivers at once, as the engine calls the round) and by
``model_loss_fn`` on a real ``nn.Module`` (one receiver, as a peer calls it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import run_cli
from fedtorrent.config import (
    DataConfig,
    MixingConfig,
    ModelConfig,
    PrivacyConfig,
    SimConfig,
    TrainConfig,
)
from fedtorrent.errors import ConfigError
from fedtorrent.mixing.round import (
    Cohorts,
    Mixed,
    PrivateTrust,
    Trust,
    check_private_mixing,
    example_gradients,
    mean_to_example_losses,
    mix_round,
    poisson_rows,
    weighted_mix,
)
from fedtorrent.mixing.trust import (
    TrustDP,
    clipped_sum,
    model_example_loss_fn,
    model_loss_fn,
    noisy_gradient,
    trust_releases,
    trust_weights,
)
from fedtorrent.sim.engine import LinearBackend
from fedtorrent.training.seeds import Stream

FEATURES, CLASSES = 4, 2


def blobs(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian blobs in ``FEATURES`` dimensions, centred at +-1 on every axis."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(CLASSES, (count,), generator=generator)
    x = torch.randn(count, FEATURES, generator=generator) * 0.8 + (2.0 * y - 1.0).unsqueeze(1)
    return x, y


def backend() -> LinearBackend:
    like = {"bias": torch.zeros(CLASSES), "weight": torch.zeros(CLASSES, FEATURES)}
    return LinearBackend(like, weight_key="weight", bias_key="bias")


def example_losses(mixed: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(R, B)`` each example's cross-entropy, written out apart from ``LinearBackend``."""
    bias, weight = mixed[:, :CLASSES], mixed[:, CLASSES:].reshape(-1, CLASSES, FEATURES)
    logits = torch.einsum("rcd,rbd->rbc", weight, x) + bias.unsqueeze(1)
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")


def good_vector() -> torch.Tensor:
    """A logistic regression that separates the blobs (bias first: ``state.flatten`` order)."""
    weight = torch.stack([-torch.ones(FEATURES), torch.ones(FEATURES)])
    return torch.cat([torch.zeros(CLASSES), weight.reshape(-1)])


def stack_of(count: int, *, attacker: int | None = None, seed: int = 0) -> torch.Tensor:
    """``(count, P)`` honest vectors near ``good_vector``; row ``attacker`` sign-flipped."""
    generator = torch.Generator().manual_seed(seed)
    base = good_vector()
    rows = base + 0.3 * torch.randn(count, base.numel(), generator=generator)
    if attacker is not None:
        rows[attacker] = -2.0 * base
    return rows


class Split:
    """Every receiver's validation split, stacked (the engine's layout, equal sizes)."""

    def __init__(self, receivers: int, count: int) -> None:
        parts = [blobs(count, seed=100 + r) for r in range(receivers)]
        self.x = torch.stack([x for x, _ in parts])
        self.y = torch.stack([y for _, y in parts])
        self.count = count

    def take(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(len(positions)).unsqueeze(1)
        return self.x[rows, positions], self.y[rows, positions]


def private_trust(
    logits: torch.Tensor,
    split: Split,
    dp: TrustDP,
    *,
    round_index: int = 0,
    fit: bool = True,
) -> Trust:
    receivers = logits.shape[0]
    generators = [torch.Generator().manual_seed(1000 * round_index + r) for r in range(receivers)]

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        raise AssertionError("a private fit never draws a plain batch")

    return Trust(
        logits=logits,
        draw=draw,
        losses=backend().losses,
        fit=fit,
        private=PrivateTrust(
            dp=dp,
            generators=generators,
            counts=[split.count] * receivers,
            take=split.take,
            noise=torch.Generator().manual_seed(7 + round_index),
            example_losses=example_losses,
        ),
    )


def everyone(shared: torch.Tensor) -> Cohorts:
    n = shared.shape[0]
    return Cohorts(
        shared=shared, members=torch.ones(n, n, dtype=torch.bool), self_column=torch.arange(n)
    )


def test_trust_dp_checks_its_settings() -> None:
    for clip, noise in [(0.0, 1.0), (1.0, 0.0), (float("nan"), 1.0), (1.0, float("inf"))]:
        with pytest.raises(ConfigError, match="trust DP"):
            TrustDP(clip=clip, noise_multiplier=noise)


def test_example_gradients_match_a_per_example_autograd_loop() -> None:
    torch.manual_seed(0)
    shared = stack_of(3)
    members = torch.tensor([[True, True, True], [True, False, True]])
    self_column = torch.tensor([0, 1])
    own = shared[self_column] + 0.1  # the own true row differs from the shared one (privacy)
    logits = torch.randn(2, 3)
    x, y = blobs(5, seed=1)
    inputs = torch.stack([x, x.flip(0)])
    targets = torch.stack([y, y.flip(0)])
    losses = backend().losses

    def mixed_losses(w: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return example_losses(weighted_mix(w, shared, own, self_column, dense=True), xs, ys)

    def generic(w: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        per_example = mean_to_example_losses(losses)
        return per_example(weighted_mix(w, shared, own, self_column, dense=True), xs, ys)

    got = example_gradients(
        logits, members, (inputs, targets), example_losses=mixed_losses, floor=0.1
    )
    assert got.shape == (2, 5, 3)
    derived = example_gradients(
        logits, members, (inputs, targets), example_losses=generic, floor=0.1
    )
    torch.testing.assert_close(derived, got, rtol=1e-5, atol=1e-6)
    for r in range(2):
        for b in range(5):
            leaf = logits.clone().requires_grad_(True)
            weights = trust_weights(leaf, members, floor=0.1)
            mixed = weighted_mix(weights, shared, own, self_column, dense=True)
            loss = losses(mixed, inputs[:, b : b + 1], targets[:, b : b + 1])[r]
            (expected,) = torch.autograd.grad(loss, leaf)
            torch.testing.assert_close(got[r, b], expected[r], rtol=1e-5, atol=1e-6)
    assert bool((got[1, :, 1] == 0).all())  # a non-member gets no gradient

    clip = 0.05
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    loop = torch.zeros(2, 3)
    for r in range(2):
        for b in range(5):
            if mask[r, b]:
                g = got[r, b]
                loop[r] += g * min(1.0, clip / float(g.norm()))
    torch.testing.assert_close(clipped_sum(got, mask, clip), loop)


def test_clipped_sum_counts_a_non_finite_example_as_zero() -> None:
    per = torch.tensor([[[3.0, 4.0], [float("nan"), 1.0], [0.3, 0.4]]])
    total = clipped_sum(per, torch.ones(1, 3, dtype=torch.bool), 1.0)
    torch.testing.assert_close(total, torch.tensor([[0.9, 1.2]]))


def test_without_noise_and_q_one_the_private_step_is_the_plain_full_batch_step() -> None:
    # trust_batch_size >= n_val: q = 1, every example in every step; a huge clip clips nothing
    # and a negligible noise multiplier adds nothing, so one DP step is the plain step on the
    # whole split.
    split = Split(receivers=3, count=40)
    shared = stack_of(3, attacker=2)
    config = MixingConfig(rule="learned", trust_steps=1, trust_batch_size=64, plausibility=0.0)
    logits = torch.zeros(3, 3)
    dp = TrustDP(clip=1e6, noise_multiplier=1e-12)
    private = mix_round(everyone(shared), config, private_trust(logits, split, dp))

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        return split.x, split.y

    plain = mix_round(everyone(shared), config, Trust(logits, draw, backend().losses))
    assert private.logits is not None and plain.logits is not None
    torch.testing.assert_close(private.logits, plain.logits, rtol=1e-4, atol=1e-6)
    assert float(plain.logits.abs().max()) > 1e-3  # the step did move the logits

    # With a clip that binds, the direction still points the same way on this toy case.
    clipped = mix_round(
        everyone(shared), config, private_trust(logits, split, TrustDP(0.05, 1e-12))
    )
    assert clipped.logits is not None
    cosine = torch.nn.functional.cosine_similarity(clipped.logits, plain.logits, dim=1)
    assert bool((cosine > 0.9).all()), cosine


def test_poisson_rows_have_the_right_mean_and_do_not_depend_on_other_receivers() -> None:
    counts, rates = [1000, 400, 0], [0.1, 0.5, 0.0]
    generators = [torch.Generator().manual_seed(s) for s in range(3)]
    sizes = []
    for _ in range(200):
        positions, mask = poisson_rows(generators, counts, rates)
        sizes.append(mask.sum(dim=1).double())
        for row, count in enumerate(counts):
            picked = positions[row][mask[row]]
            assert bool((picked < max(1, count)).all())
            assert len(set(picked.tolist())) == len(picked)  # without replacement
        assert bool((positions[~mask] == 0).all())
    mean = torch.stack(sizes).mean(dim=0)
    # std of the mean over 200 draws: sqrt(n q (1 - q) / 200) = 0.67 and 0.71
    assert abs(float(mean[0]) - 100) < 3 and abs(float(mean[1]) - 200) < 3
    assert float(mean[2]) == 0
    # A peer (receiver 1 alone) draws what the engine drew for it.
    alone, mask = poisson_rows([torch.Generator().manual_seed(1)], [400], [0.5])
    together, masks = poisson_rows(
        [torch.Generator().manual_seed(s) for s in range(3)], counts, rates
    )
    assert torch.equal(alone[0][mask[0]], together[1][masks[1]])


def test_noise_has_the_stated_scale_and_spares_non_members() -> None:
    dp = TrustDP(clip=2.0, noise_multiplier=3.0)
    members = torch.ones(400, 3, dtype=torch.bool)
    members[:, 2] = False
    grad = noisy_gradient(
        torch.zeros(400, 1, 3),
        torch.ones(400, 1, dtype=torch.bool),
        dp=dp,
        expected=torch.full((400,), 4.0),
        members=members,
        generator=torch.Generator().manual_seed(0),
    )
    assert bool((grad[:, 2] == 0).all())
    assert abs(float(grad[:, :2].std()) - 3.0 * 2.0 / 4.0) < 0.1


def test_the_round_reports_its_releases_for_the_accountant() -> None:
    split = Split(receivers=3, count=500)
    dp = TrustDP(clip=1.0, noise_multiplier=1.3)
    config = MixingConfig(rule="learned", trust_steps=4, trust_batch_size=50, plausibility=0.0)
    mixed = mix_round(everyone(stack_of(3)), config, private_trust(torch.zeros(3, 3), split, dp))
    assert mixed.releases == tuple(((1.3, 0.1, 4),) for _ in range(3))
    assert mixed.releases[0] == trust_releases(dp, count=500, batch_size=50, steps=4)
    unfitted = private_trust(torch.zeros(3, 3), split, dp, fit=False)
    assert mix_round(everyone(stack_of(3)), config, unfitted).releases == ((), (), ())
    assert trust_releases(dp, count=0, batch_size=50, steps=4) == ()
    assert trust_releases(dp, count=20, batch_size=50, steps=4) == ((1.3, 1.0, 4),)
    plain = Trust(torch.zeros(3, 3), lambda: (split.x, split.y), backend().losses)
    assert mix_round(everyone(stack_of(3)), config, plain).releases == ((), (), ())


def test_private_trust_gives_a_sign_flipped_member_less_weight_than_honest_ones() -> None:
    n, attacker = 5, 4
    split = Split(receivers=n, count=400)
    shared = stack_of(n, attacker=attacker)
    config = MixingConfig(rule="learned", trust_steps=5, trust_batch_size=64, plausibility=0.0)
    dp = TrustDP(clip=1.0, noise_multiplier=1.0)
    logits = torch.zeros(n, n)
    mixed: Mixed | None = None
    for round_index in range(4):
        mixed = mix_round(
            everyone(shared), config, private_trust(logits, split, dp, round_index=round_index)
        )
        assert mixed.logits is not None
        logits = mixed.logits
    assert mixed is not None and mixed.weights is not None
    honest = [r for r in range(n) if r != attacker]
    for r in honest:
        to_honest = mixed.weights[r, honest]
        assert float(mixed.weights[r, attacker]) < float(to_honest.min()), mixed.weights[r]
    assert bool(torch.isfinite(mixed.weights).all())
    torch.testing.assert_close(mixed.weights.sum(dim=1), torch.ones(n))


def test_a_peer_fits_privately_through_a_real_module() -> None:
    # R = 1 over [self, *heard], the loss through model_loss_fn as a peer builds it.
    model = nn.Sequential(nn.Linear(FEATURES, CLASSES))
    keys = sorted(model.state_dict())  # "0.bias", "0.weight": the flat order of good_vector
    shared = stack_of(3, attacker=2)
    x_val, y_val = blobs(300, seed=5)

    def losses(mixed: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model.eval()
        return model_loss_fn(model, x[0], y[0], keys=keys)(mixed[0]).unsqueeze(0)

    def per_example(mixed: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model.eval()
        return model_example_loss_fn(model, x[0], y[0], keys=keys)(mixed[0]).unsqueeze(0)

    def take(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x_val[positions[0]].unsqueeze(0), y_val[positions[0]].unsqueeze(0)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        raise AssertionError("a private fit never draws a plain batch")

    config = MixingConfig(rule="learned", trust_steps=10, trust_batch_size=64, plausibility=0.0)
    trust = Trust(
        logits=torch.zeros(1, 3),
        draw=draw,
        losses=losses,
        private=PrivateTrust(
            dp=TrustDP(clip=1.0, noise_multiplier=1.0),
            generators=[torch.Generator().manual_seed(3)],
            counts=[300],
            take=take,
            noise=torch.Generator().manual_seed(4),
            example_losses=per_example,
        ),
    )
    cohorts = Cohorts(
        shared=shared,
        members=torch.ones(1, 3, dtype=torch.bool),
        self_column=torch.zeros(1, dtype=torch.long),
    )
    mixed = mix_round(cohorts, config, trust)
    assert mixed.weights is not None
    assert float(mixed.weights[0, 2]) < float(mixed.weights[0, :2].min())
    assert mixed.releases == (((1.0, 64 / 300, 10),),)


def test_rules_that_read_validation_data_without_dp_are_refused() -> None:
    split = Split(receivers=2, count=50)
    dp = TrustDP(clip=1.0, noise_multiplier=1.0)
    fomo = MixingConfig(rule="fedfomo", plausibility=0.0)
    with pytest.raises(ConfigError, match="fedfomo"):
        mix_round(everyone(stack_of(2)), fomo, private_trust(torch.zeros(2, 2), split, dp))
    checked = MixingConfig(rule="learned", trust_margin=0.01)
    with pytest.raises(ConfigError, match="trust_margin"):
        check_private_mixing(checked)
    check_private_mixing(MixingConfig(rule="learned"))  # the default is fine
    check_private_mixing(MixingConfig(rule="fixed", trust_margin=0.01))  # no check runs there


def test_a_task_loss_per_example_matches_its_mean_loss() -> None:
    model = nn.Sequential(nn.Linear(FEATURES, CLASSES))
    x, y = blobs(12, seed=9)
    flat = good_vector() * 0.3
    keys = sorted(model.state_dict())

    def task_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(out, target, label_smoothing=0.1)

    per = model_example_loss_fn(model, x, y, loss=task_loss, keys=keys)(flat)
    mean = model_loss_fn(model, x, y, loss=task_loss, keys=keys)(flat)
    assert per.shape == (12,)
    torch.testing.assert_close(per.mean(), mean)
    plain = model_example_loss_fn(model, x, y, keys=keys)(flat)
    torch.testing.assert_close(plain.mean(), model_loss_fn(model, x, y, keys=keys)(flat))


# --- wired in: the simulator, the command line, the torrent ----------------------------------


def _digits(**privacy: object) -> SimConfig:
    return SimConfig(
        data=DataConfig(dataset="digits", num_nodes=3),
        model=ModelConfig(name="logreg"),
        train=TrainConfig(batch_size=32, lr=0.5),
        mixing=MixingConfig(rule="learned", trust_steps=3, trust_batch_size=16),
        rounds=3,
        round_schedule="constant",
        privacy=PrivacyConfig(clip=1.0, unit="example", **privacy),  # type: ignore[arg-type]
    )


def _opacus_epsilons(config: SimConfig, train: int, val: int, noise: float) -> list[float]:
    """Each round's epsilon of training plus trust steps, from Opacus's own accountant."""
    from opacus.accountants import RDPAccountant

    assert config.privacy is not None
    rate = config.train.batch_size / train
    steps = round(config.train.epochs / rate)
    trust_rate = min(1.0, config.mixing.trust_batch_size / val)
    accountant, out = RDPAccountant(), []
    for _ in range(config.rounds):
        for _ in range(steps):
            accountant.step(noise_multiplier=noise, sample_rate=rate)
        for _ in range(config.mixing.trust_steps):
            accountant.step(noise_multiplier=config.privacy.trust_noise, sample_rate=trust_rate)
        out.append(accountant.get_epsilon(delta=config.privacy.delta))
    return out


def _sizes(config: SimConfig) -> list[tuple[int, int]]:
    from fedtorrent.data.datasets import load_dataset
    from fedtorrent.data.partition import split_nodes

    dataset = load_dataset("digits", progress=False)
    return [(len(s.train), len(s.val)) for s in split_nodes(dataset.y_train, config.data)]


def test_the_simulators_epsilon_per_round_counts_the_private_trust_fit(tmp_path: Path) -> None:
    from fedtorrent.metrics.records import read_records
    from fedtorrent.privacy import ExampleDP, ExamplePrivacy
    from fedtorrent.sim.run import simulate

    config = _digits(noise_multiplier=1.0)
    (run,), _ = simulate(config, out_dir=tmp_path, plots=False, progress=False)
    records = read_records(tmp_path / "rounds.jsonl")
    for node, (train, val) in enumerate(_sizes(config)):
        got = [r["epsilon"] for r in records if r["node"] == node]
        assert got == pytest.approx(_opacus_epsilons(config, train, val, 1.0), rel=1e-6)
        dp = ExampleDP(clip=1.0, noise_multiplier=1.0, sample_rate=32 / train,
                       steps=round(train / 32))  # fmt: skip
        training_only = ExamplePrivacy(dp, delta=1e-5)
        assert got[-1] > [training_only.charge_round() for _ in range(3)][-1]
    assert run.security is not None and run.security["epsilon"] == pytest.approx(
        max(r["epsilon"] for r in records if r["round"] == 3)
    )
    assert min(run.accuracies) > 0.6


def test_a_target_epsilon_covers_the_trust_fit_too(tmp_path: Path) -> None:
    from fedtorrent.metrics.records import read_records
    from fedtorrent.privacy import example_dp
    from fedtorrent.sim.run import simulate

    config = _digits(target_epsilon=2.0)
    simulate(config, out_dir=tmp_path, plots=False, progress=False)
    finals = [r["epsilon"] for r in read_records(tmp_path / "rounds.jsonl") if r["round"] == 3]
    assert all(1.98 <= e <= 2.0 + 1e-6 for e in finals), finals
    # More training noise than a target without the trust fit would need.
    assert config.privacy is not None
    train = _sizes(config)[0][0]
    alone = example_dp(config.privacy, config.train, examples=train, rounds=3)
    assert config.privacy is not None
    with_trust = example_dp(
        config.privacy, config.train, examples=train, rounds=3,
        trust=((config.privacy.trust_noise, 0.25, config.mixing.trust_steps),),
    )  # fmt: skip
    assert with_trust.noise_multiplier > alone.noise_multiplier


def test_a_trust_fit_that_alone_spends_the_target_is_refused_in_one_line() -> None:
    from fedtorrent.errors import PrivacyError
    from fedtorrent.privacy import ExamplePrivacy

    config = _digits(target_epsilon=2.0)
    assert config.privacy is not None
    with pytest.raises(PrivacyError, match="raise --dp-trust-noise") as caught:
        ExamplePrivacy.from_config(config.privacy, config.train, examples=500, rounds=3,
                                   trust=((0.5, 1.0, 10),))  # fmt: skip
    assert "\n" not in str(caught.value)


def test_next_epsilon_projects_the_planned_trust_releases() -> None:
    from fedtorrent.privacy import ExampleDP, ExamplePrivacy

    dp = ExampleDP(clip=1.0, noise_multiplier=1.1, sample_rate=0.05, steps=20)
    plan = trust_releases(TrustDP(0.1, 5.0), count=400, batch_size=64, steps=10)
    private = ExamplePrivacy(dp, delta=1e-5, trust=plan)
    projected = private.next_epsilon()
    assert projected == pytest.approx(private.charge_round(plan))
    assert private.accountant.history == [(5.0, 0.16, 10), (1.1, 0.05, 20)]
    quiet = ExamplePrivacy(dp, delta=1e-5, trust=plan)  # a round nobody was heard in
    assert quiet.charge_round() < projected
    # The trust fit's noise is the same secret seed, salted: another stream, redrawn alike.
    trust_noise = torch.randn(4, generator=private.noise_generator(1, Stream.TRUST_NOISE))
    assert not torch.equal(trust_noise, torch.randn(4, generator=private.noise_generator(1)))
    assert torch.equal(
        trust_noise, torch.randn(4, generator=private.noise_generator(1, Stream.TRUST_NOISE))
    )


def test_rules_without_a_private_version_are_refused_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dp = ["--dp-unit", "example", "--dp-clip", "1", "--dp-noise", "1"]
    runs = (
        ["simulate", "--dataset", "digits", "--nodes", "2", "--rounds", "1", "--no-plots",
         "--no-progress", "--mixing", "fedfomo", "--out", str(tmp_path / "run"), *dp],
        ["create", "--output", str(tmp_path / "s.torrent"), "--dataset", "digits", "--nodes", "2",
         "--mixing", "fedfomo", *dp],
        ["simulate", "--dataset", "digits", "--nodes", "2", "--rounds", "1", "--no-plots",
         "--no-progress", "--mixing", "learned", "--dp-trust-noise", "0",
         "--out", str(tmp_path / "run"), *dp],
    )  # fmt: skip
    for args, message in zip(
        runs, ("fedfomo scores", "fedfomo scores", "trust_noise"), strict=True
    ):
        capsys.readouterr()
        assert run_cli(monkeypatch, *args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not (tmp_path / "run").exists() and not (tmp_path / "s.torrent").exists()
    capsys.readouterr()
    assert run_cli(monkeypatch, "simulate", "--help") == 0
    assert "--dp-trust-noise" in capsys.readouterr().out


def test_the_torrent_carries_the_trust_fits_settings(tmp_path: Path) -> None:
    import dataclasses

    from fedtorrent.errors import TorrentError
    from fedtorrent.net.torrent import Session, load_torrent, save_torrent
    from test_peer import make_torrent

    path = make_torrent(tmp_path, rule="learned")
    torrent = load_torrent(path)
    default = PrivacyConfig(clip=1.0, noise_multiplier=1.0, unit="example")
    tuned = dataclasses.replace(default, trust_clip=0.25, trust_noise=8.0)
    hashes = []
    for privacy in (default, tuned):
        session = dataclasses.replace(torrent.session, privacy=privacy)
        save_torrent(dataclasses.replace(torrent, session=session), path)
        again = load_torrent(path)
        assert again.session.privacy == privacy
        hashes.append(again.info_hash)
    info = load_torrent(path).session.to_info()
    assert info[b"privacy"][b"trust_noise"] == b"8.0"
    default_info = dataclasses.replace(torrent.session, privacy=default).to_info()
    assert b"trust_clip" not in default_info[b"privacy"]  # older torrents: the defaults
    assert len(set(hashes)) == 2
    info[b"privacy"][b"trust_noise"] = b"-1"
    with pytest.raises(TorrentError, match="trust_noise"):
        Session.from_info(info)
    info[b"privacy"][b"trust_noise"] = b"8.0"
    info[b"mixing"][b"rule"] = b"fedfomo"
    with pytest.raises(TorrentError, match="fedfomo"):
        Session.from_info(info)
