"""Example-level DP-SGD for local training: Poisson batches, clipped per-example gradients, noise.

The protected unit is one training example. Each local optimizer step

1. samples a batch by Poisson sampling: every one of the node's ``n`` examples joins it with
   probability ``q = sample_rate``, independently (:func:`poisson_batches`), as the accountant
   assumes; a batch may be empty;
2. computes every example's gradient with ``torch.func`` (``functional_call`` under
   ``vmap(grad)``), so any model and loss work; the per-example loss is the task's loss on a
   batch of one, which is why a task's loss must be the *mean* over the batch (``reduction``
   mean, as every ``torch.nn.functional`` loss is by default);
3. clips each example's gradient to L2 norm ``clip`` over all trainable parameters jointly, sums
   them, adds ``N(0, (noise_multiplier * clip)^2)`` to every coordinate and divides by the
   *expected* batch size ``q * n`` (Opacus's convention; :func:`noisy_gradient`, the one function
   every training path calls), then takes the optimizer's step. An empty batch still takes a
   step, on noise alone.

Each step is one release of the sampled Gaussian mechanism at rate ``q``; a round is ``steps``
of them, fixed in advance (:class:`ExampleDP`) so the accountant can plan the noise for a target
epsilon and project the next round. Everything a peer shares is post-processing of its training,
so :class:`ExamplePrivacy`'s epsilon after each round is its whole guarantee; nothing is added to
the shared state.

Not supported: BatchNorm in train mode (its statistics mix the examples of a batch; use
GroupNorm or LayerNorm) and a task's own ``train_step`` (we cannot clip inside user code); both
are refused with one line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from fedtorrent.config import PrivacyConfig, TrainConfig
from fedtorrent.errors import PrivacyError
from fedtorrent.privacy.accountant import (
    PrivacyAccountant,
    Release,
    _check_release,
    _epsilon,
    resolve_noise_multiplier,
)

LossFn = Callable[[Tensor, Tensor], Tensor]
_CHUNK_FLOATS = 2**24
"""Per-example gradient floats held at once (64 MiB); larger batches are cut into chunks."""
_MAX_SEED = 2**63


@dataclass(frozen=True)
class ExampleDP:
    """DP-SGD settings of one node's local training (see the module doc).

    Attributes:
        clip: L2 bound on every example's gradient (all trainable parameters jointly).
        noise_multiplier: noise std over ``clip``.
        sample_rate: Poisson rate ``q``: the chance each training example joins a step's batch.
        steps: optimizer steps (releases) per round, fixed and known in advance.
    """

    clip: float
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, int | float) and 0 < self.clip < math.inf):
            raise PrivacyError(f"DP-SGD clip must be a finite number > 0, got {self.clip!r}")
        _check_release(self.noise_multiplier, self.sample_rate, self.steps)

    def expected_batch(self, examples: int) -> float:
        """``q * examples``: what the noisy gradient sum is divided by."""
        return self.sample_rate * examples


def example_dp(
    config: PrivacyConfig,
    train: TrainConfig,
    *,
    examples: int,
    rounds: int,
    trust: Sequence[Release] = (),
) -> ExampleDP:
    """The DP-SGD settings of a node with ``examples`` training examples in a session.

    ``q = min(1, batch_size / examples)``; steps per round are ``train.steps``, else
    ``round(epochs / q)`` (as many steps as ``epochs`` passes take in expectation); the noise is
    ``config.noise_multiplier``, else the smallest one that keeps epsilon within
    ``config.target_epsilon`` after ``rounds`` rounds of those steps plus the releases ``trust``
    (the private trust fit's of one round, ``mixing.trust.trust_releases``) every round, all on
    one accountant (Opacus's).

    Raises:
        PrivacyError: ``config`` is not example-level DP, the node has no examples, the round has
            no steps (``epochs=0``), or the target cannot be met.
    """
    if not config.example_level:
        raise PrivacyError("example-level DP needs a privacy config with unit 'example' and clip")
    assert config.clip is not None  # example_level
    if examples < 1:
        raise PrivacyError("example-level DP needs at least one training example")
    rate = min(1.0, train.batch_size / examples)
    steps = train.steps if train.steps is not None else round(train.epochs / rate)
    if steps < 1:
        raise PrivacyError("example-level DP needs at least one local step per round (epochs > 0)")
    try:
        noise = resolve_noise_multiplier(
            config, rounds, sample_rate=rate, steps_per_round=steps, extra_per_round=trust
        )
    except PrivacyError as exc:
        if not trust:
            raise
        raise PrivacyError(
            f"{exc}; the other releases are the private trust fit's: raise --dp-trust-noise, "
            "or lower the trust steps or batch size"
        ) from None
    return ExampleDP(clip=config.clip, noise_multiplier=noise, sample_rate=rate, steps=steps)


def poisson_batches(examples: int, dp: ExampleDP, generator: torch.Generator) -> list[Tensor]:
    """``dp.steps`` batches of positions in ``range(examples)``, each Poisson-sampled at ``q``.

    Every batch draws ``examples`` uniforms from ``generator`` (a CPU generator): position ``i``
    joins when its draw is below ``q``. A batch may be empty; sizes have mean ``q * examples``.
    """
    return [
        (torch.rand(examples, generator=generator) < dp.sample_rate).nonzero().flatten()
        for _ in range(dp.steps)
    ]


def clip_factors(squared_norms: Tensor, clip: float) -> Tensor:
    """``min(1, clip / ||g_i||)`` from each example's squared gradient norm ``(B,)``."""
    return (clip / squared_norms.sqrt().clamp_min(1e-12)).clamp_max(1.0)


def clip_and_sum(per_example: Sequence[Tensor], clip: float) -> list[Tensor]:
    """``sum_i g_i min(1, clip / ||g_i||)``: each example's gradient clipped, then summed.

    ``per_example`` holds one ``(B, *shape)`` tensor per parameter; an example's norm is over
    all of them jointly. The result (one ``shape`` tensor per parameter) has norm at most
    ``clip * B``, and changing one example moves it by at most ``clip``.
    """
    if not per_example:
        return []
    batch = int(per_example[0].shape[0])
    flat = [grad.reshape(batch, -1) for grad in per_example]
    squares = torch.stack([f.square().sum(dim=1) for f in flat]).sum(dim=0)
    scale = clip_factors(squares, clip)
    return [
        (scale.to(f.dtype) @ f).reshape(grad.shape[1:])
        for f, grad in zip(flat, per_example, strict=True)
    ]


def add_noise(
    summed: Sequence[Tensor], *, dp: ExampleDP, expected_batch: float, generator: torch.Generator
) -> list[Tensor]:
    """``(summed + N(0, (noise_multiplier clip)^2 I)) / expected_batch``, tensor after tensor.

    The noise is drawn on the CPU from ``generator`` in the order of ``summed`` (the same seed
    gives the same noise on every device); ``summed`` is not modified.
    """
    std = dp.noise_multiplier * dp.clip
    out = []
    for part in summed:
        noise = torch.randn(part.shape, generator=generator, dtype=part.dtype)
        out.append((part + noise.to(part.device) * std) / expected_batch)
    return out


def noisy_gradient(
    chunks: Iterator[Sequence[Tensor]] | Sequence[Sequence[Tensor]],
    like: Sequence[Tensor],
    *,
    dp: ExampleDP,
    expected_batch: float,
    generator: torch.Generator,
) -> list[Tensor]:
    """DP-SGD's gradient: clipped per-example sums plus Gaussian noise, over the expected batch.

    Args:
        chunks: per-example gradients, a chunk at a time (each as :func:`clip_and_sum` takes
            them); none at all for an empty batch.
        like: one tensor per parameter, for shapes, dtypes and devices.
        dp: the clip and the noise multiplier.
        expected_batch: ``q * n`` (:meth:`ExampleDP.expected_batch`).
        generator: a CPU generator the noise is drawn from (parameter after parameter), so the
            same seed gives the same noise on every device.

    Returns:
        ``(sum of clipped gradients + N(0, (sigma clip)^2 I)) / expected_batch`` per parameter.
    """
    total = [torch.zeros_like(t) for t in like]
    for chunk in chunks:
        for i, part in enumerate(clip_and_sum(chunk, dp.clip)):
            total[i] += part
    return add_noise(total, dp=dp, expected_batch=expected_batch, generator=generator)


def check_private_model(model: nn.Module) -> None:
    """Refuse a model whose per-example gradients are not defined (BatchNorm in train mode).

    Raises:
        PrivacyError: the model has a BatchNorm layer.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise PrivacyError(
                f"example-level DP cannot train {type(module).__name__} layer {name!r}: its "
                "batch statistics mix examples (use GroupNorm or LayerNorm)"
            )


def private_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss: LossFn,
    optimizer: torch.optim.Optimizer,
    dp: ExampleDP,
    expected_batch: float,
    generator: torch.Generator,
) -> Tensor:
    """One DP-SGD step on the Poisson batch ``(x, y)``; its mean loss (0 when empty), detached.

    The trainable parameters' ``.grad`` become :func:`noisy_gradient` of the per-example
    gradients of ``loss`` (the mean loss of a batch, applied to each example alone), then
    ``optimizer.step()`` runs. Buffers enter as they are and are not updated.

    Raises:
        PrivacyError: the model or loss cannot be differentiated per example by ``torch.func``.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    losses: list[Tensor] = []
    chunks = _per_example_chunks(
        model, loss, x, y, names=[name for name, _ in named], losses=losses
    )
    grads = noisy_gradient(
        chunks,
        [p.detach() for _, p in named],
        dp=dp,
        expected_batch=expected_batch,
        generator=generator,
    )
    for (_, parameter), grad in zip(named, grads, strict=True):
        parameter.grad = grad
    optimizer.step()
    if not losses:
        return torch.zeros(())
    return torch.cat(losses).mean().detach()


def _per_example_chunks(
    model: nn.Module,
    loss: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    names: Sequence[str],
    losses: list[Tensor],
) -> Iterator[list[Tensor]]:
    """Per-example gradients of ``names`` in chunks of examples; appends each chunk's losses."""
    count = int(x.shape[0])
    if count == 0 or not names:
        return
    params = {name: p.detach() for name, p in model.named_parameters() if name in set(names)}
    frozen = {name: p.detach() for name, p in model.named_parameters() if name not in params}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    size = max(1, _CHUNK_FLOATS // max(1, sum(p.numel() for p in params.values())))

    def one(weights: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        state = {**frozen, **buffers, **weights}
        out = functional_call(model, state, (xi.unsqueeze(0),))
        value: Tensor = loss(out, yi.unsqueeze(0))
        return value.reshape(())

    batched = vmap(grad_and_value(one), in_dims=(None, 0, 0), randomness="different")
    for start in range(0, count, size):
        try:
            grads, values = batched(params, x[start : start + size], y[start : start + size])
        except Exception as exc:  # torch.func names the layer or op; one line for the user
            text = str(exc).strip().splitlines()
            raise PrivacyError(
                "example-level DP cannot compute per-example gradients of this model and loss "
                f"with torch.func: {type(exc).__name__}: {text[0] if text else ''}"[:400]
            ) from exc
        losses.append(values.detach().reshape(-1))
        yield [grads[name] for name in names]


class ExamplePrivacy:
    """One node's example-level privacy state: its DP-SGD settings and its accountant.

    Conforms to the peers' privacy protocol (``PeerPrivacy``): ``accountant``, ``epsilon``,
    ``next_epsilon()``, ``state_dict()`` and ``load_state_dict()``; :meth:`charge_round` records
    a round's ``dp.steps`` releases, and what its private trust fit released, after the round.

    Args:
        dp: the node's DP-SGD settings (:func:`example_dp`).
        delta: the accountant's delta.
        mechanism: ``rdp`` or ``prv``.
        noise_seed: seeds the gradient noise of each round (:meth:`noise_generator`). In a real
            deployment it must be secret (whoever knows it can subtract the noise), so a peer
            draws it at random; the simulator derives its noise from the run seed instead.
        trust: what the node's private trust fit releases in a round that fits
            (``mixing.trust.trust_releases``; none without learned trust): the plan
            :meth:`next_epsilon` projects, and that a target epsilon was derived with.
    """

    unit = "example"
    """What the guarantee protects: any one training example."""

    def __init__(
        self,
        dp: ExampleDP,
        *,
        delta: float,
        mechanism: str = "rdp",
        noise_seed: int = 0,
        trust: Sequence[Release] = (),
    ) -> None:
        if not (isinstance(noise_seed, int) and 0 <= noise_seed < _MAX_SEED):
            raise PrivacyError("noise_seed must be an int in [0, 2**63)")
        for release in trust:
            _check_release(*release)
        self.dp = dp
        self.trust: tuple[Release, ...] = tuple(trust)
        self.accountant = PrivacyAccountant(delta=delta, mechanism=mechanism)
        self._noise_seed = noise_seed

    @classmethod
    def from_config(
        cls,
        config: PrivacyConfig,
        train: TrainConfig,
        *,
        examples: int,
        rounds: int,
        noise_seed: int = 0,
        trust: Sequence[Release] = (),
    ) -> ExamplePrivacy:
        """The state of a node with ``examples`` training examples (see :func:`example_dp`)."""
        dp = example_dp(config, train, examples=examples, rounds=rounds, trust=trust)
        return cls(
            dp,
            delta=config.delta,
            mechanism=config.accountant,
            noise_seed=noise_seed,
            trust=trust,
        )

    @property
    def noise_multiplier(self) -> float:
        """The gradient noise std over the clip."""
        return self.dp.noise_multiplier

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at the accountant's delta (0.0 before the first round)."""
        return self.accountant.epsilons[-1] if self.accountant.epsilons else 0.0

    def charge_round(self, trust: Sequence[Release] = ()) -> float:
        """Close a round: record its ``dp.steps`` training releases and ``trust``.

        ``trust`` is what the round's private trust fit released (``Mixed.releases`` of the
        node; none when it fitted nothing). Returns the epsilon spent so far.
        """
        for noise, rate, steps in trust:
            self.accountant.record(noise_multiplier=noise, sample_rate=rate, steps=steps)
        dp = self.dp
        return self.accountant.record_round(
            noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate, steps=dp.steps
        )

    def next_epsilon(self) -> float:
        """The epsilon after one more round (planned trust releases included), recording nothing."""
        dp = self.dp
        history = [
            *self.accountant.history,
            *self.trust,
            (dp.noise_multiplier, dp.sample_rate, dp.steps),
        ]
        return _epsilon(self.accountant.mechanism, history, self.accountant.delta)

    def noise_generator(self, round_index: int, *salt: int) -> torch.Generator:
        """The CPU generator of round ``round_index``'s noise, from the secret noise seed.

        No ``salt``: the gradient noise of local training. A peer's private trust fit draws its
        noise with ``salt`` ``Stream.TRUST_NOISE``: independent of the training noise, as
        secret, and the same draws again when a resumed peer redoes the round.
        """
        state = np.random.SeedSequence([self._noise_seed, round_index, *salt]).generate_state(2)
        return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-ready state: the unit, the settings, the noise seed and the accountant."""
        return {
            "unit": "example",
            "dp": asdict(self.dp),
            "noise_seed": self._noise_seed,
            "accountant": self.accountant.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; checks every field, since it comes from a file.

        Raises:
            PrivacyError: another unit, other DP settings, a bad seed or a bad accountant state.
        """
        if not isinstance(state, Mapping) or state.get("unit") != "example":
            raise PrivacyError("privacy state is not an example-level (DP-SGD) state")
        settings = state.get("dp")
        if not isinstance(settings, Mapping) or set(settings) != set(asdict(self.dp)):
            raise PrivacyError("privacy state has malformed DP-SGD settings")
        if ExampleDP(**settings) != self.dp:
            raise PrivacyError(
                f"privacy state was saved for DP-SGD settings {dict(settings)}, not "
                f"{asdict(self.dp)}"
            )
        seed = state.get("noise_seed")
        if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < _MAX_SEED):
            raise PrivacyError(f"privacy state has a bad noise seed: {seed!r}")
        accountant = state.get("accountant")
        if not isinstance(accountant, Mapping):
            raise PrivacyError("privacy state needs an accountant state")
        self.accountant.load_state_dict(accountant)
        self._noise_seed = seed
