"""Sample-level DP-SGD for a peer's local training, through Opacus's ``PrivacyEngine``.

An alternative to noising the shared update: every example's gradient is clipped to ``clip`` and
noised, batches are Poisson-sampled, and each optimizer step is one release at the local sampling
rate, recorded in the peer's :class:`PrivacyAccountant`. The shared update is then post-processing
and needs no further noise. The guarantee is per training example, not per peer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedtorrent.errors import PrivacyError
from fedtorrent.privacy.accountant import PrivacyAccountant


@dataclass(frozen=True)
class DPSGD:
    """The private stand-ins to train with; ``close()`` when the round's training is done.

    ``module`` wraps the original model and trains its parameters in place, so the caller keeps
    reading and loading ``model.state_dict()`` (without Opacus's ``_module.`` prefix).
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    data_loader: DataLoader[Any]
    sample_rate: float

    def close(self) -> None:
        """Remove Opacus's per-sample gradient hooks so the model can be wrapped again."""
        remove = getattr(self.module, "remove_hooks", None)
        if callable(remove):
            remove()


def make_dp_sgd(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    *,
    clip: float,
    noise_multiplier: float,
    accountant: PrivacyAccountant,
    generator: torch.Generator,
) -> DPSGD:
    """Wrap model, optimizer and loader for DP-SGD; each step is charged to ``accountant``.

    ``generator`` drives both the Poisson batch sampling and the gradient noise, so a seed fixes
    the run. Call ``accountant.end_round()`` after the round's local steps.

    Raises:
        PrivacyError: bad settings, or a model Opacus cannot compute per-sample gradients for
            (BatchNorm, for example: swap it for GroupNorm).
    """
    if not (clip > 0 and noise_multiplier > 0):
        raise PrivacyError(f"clip and noise_multiplier must be > 0, got {clip}, {noise_multiplier}")
    from opacus import PrivacyEngine  # noqa: PLC0415 (slow import)
    from opacus.data_loader import DPDataLoader  # noqa: PLC0415 (slow import)
    from opacus.validators import ModuleValidator  # noqa: PLC0415 (slow import)

    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise PrivacyError(f"model is not DP-SGD compatible: {'; '.join(map(str, problems))}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "secure RNG turned off": we seed on purpose
        engine = PrivacyEngine(accountant=accountant.mechanism)
        loader = DPDataLoader.from_data_loader(data_loader, generator=generator)
        module, dp_optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=clip,
            poisson_sampling=False,  # already Poisson: ``loader`` samples with ``generator``
            noise_generator=generator,
        )
    sample_rate = 1 / len(dp_loader)
    # Charge our accountant instead of the engine's (the optimizer holds one hook).
    dp_optimizer.attach_step_hook(
        accountant.opacus_accountant.get_optimizer_hook_fn(sample_rate=sample_rate)
    )
    return DPSGD(
        module=module, optimizer=dp_optimizer, data_loader=dp_loader, sample_rate=sample_rate
    )
