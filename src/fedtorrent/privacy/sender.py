"""Update-level DP on one peer's send path: the send hook a session's ``PrivacyConfig`` builds.

Each round the peer shares ``reference + privatize(trained - reference)`` once, the same state to
every receiver, and the accountant records one release at ``sample_rate=1``.

``reference`` is *public*: what the peer's cohort can compute it held after its last mix, i.e. the
mix (same rule, same weights) of the states it received with its own **shared** state in row 0,
not its true one. The peer itself keeps mixing its true state; were the reference that true mix,
the next share would carry ``w_self * (trained - shared)`` (the clipped-off part of the update
and minus the noise) un-noised, and receivers could subtract it out round after round. The update
clipped each round therefore includes the part of the last update that clipping or noise held
back. The reference starts at the torrent's initial state.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedtorrent.config import PrivacyConfig
from fedtorrent.errors import PrivacyError
from fedtorrent.privacy.accountant import PrivacyAccountant, resolve_noise_multiplier
from fedtorrent.privacy.mechanism import privatize_state

State = dict[str, torch.Tensor]


class PrivateSender:
    """The send hook ``(trained state, round) -> state to share`` of a private session.

    Args:
        config: the session's privacy settings (update-level DP; ``dp_sgd`` is refused).
        rounds: rounds planned, to derive the noise from a target epsilon.
        initial: the session's initial state, the first reference.
        noise_seed: seeds the noise of each round. It must be secret: whoever knows it can
            subtract the noise, so a peer draws one at random (never the session's seed).
    """

    def __init__(
        self, config: PrivacyConfig, *, rounds: int, initial: Mapping[str, torch.Tensor],
        noise_seed: int,
    ) -> None:  # fmt: skip
        if not config.enabled:
            raise PrivacyError("privacy is off in this config: nothing to build a sender for")
        assert config.clip is not None  # enabled
        self.clip = config.clip
        self.noise_multiplier = resolve_noise_multiplier(config, rounds)
        self.accountant = PrivacyAccountant(delta=config.delta, mechanism=config.accountant)
        self.reference: State = {k: v.detach().clone() for k, v in initial.items()}
        self._noise_seed = noise_seed
        self.shared: State | None = None
        """The state shared last (None before the first round)."""

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at the config's delta (0.0 before the first round)."""
        return self.accountant.epsilons[-1] if self.accountant.epsilons else 0.0

    def __call__(self, state: State, round: int) -> State:
        """Clip and noise the change since the public reference; charge one release."""
        seeds = np.random.SeedSequence([self._noise_seed, round]).generate_state(2)
        generator = torch.Generator().manual_seed(int(seeds[0]) << 31 ^ int(seeds[1]))
        self.shared = privatize_state(
            state,
            self.reference,
            clip=self.clip,
            noise_multiplier=self.noise_multiplier,
            generator=generator,
        )
        self.accountant.record_round(noise_multiplier=self.noise_multiplier)
        return self.shared

    def mixed(self, public: Mapping[str, torch.Tensor]) -> None:
        """Set the next reference: the round's mix with the shared state as the own row."""
        self.reference = {k: v.detach().clone() for k, v in public.items()}

    def resume(self, rounds_done: int, reference: Mapping[str, torch.Tensor]) -> None:
        """After a restart: charge the rounds already shared and take ``reference`` as the base."""
        for _ in range(rounds_done):
            self.accountant.record_round(noise_multiplier=self.noise_multiplier)
        self.mixed(reference)
