"""Update-level DP on one peer's send path, and the privacy state every private peer keeps.

Each round the peer shares ``reference + privatize(trained - reference)`` once, the same state to
every receiver, and the accountant records one release at ``sample_rate=1``.

``reference`` is *public*: what the peer's cohort can compute it held after its last mix, i.e. the
mix (same rule, same weights) of the states it received with its own **shared** state in row 0,
not its true one. The peer itself keeps mixing its true state; were the reference that true mix,
the next share would carry ``w_self * (trained - shared)`` (the clipped-off part of the update
and minus the noise) un-noised, and receivers could subtract it out round after round. The update
clipped each round therefore includes the part of the last update that clipping or noise held
back. The reference starts at the torrent's initial state, and after ``--resume`` it is the
checkpointed one (:meth:`PrivateSender.load_state_dict`), never rebuilt from the true model.

:class:`PeerPrivacy` is what a peer (its checkpoint, its budget check, its reports) asks of any
privacy object it holds, update-level or example-level alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from fedtorrent.config import PrivacyConfig
from fedtorrent.errors import PrivacyError
from fedtorrent.privacy.accountant import PrivacyAccountant, resolve_noise_multiplier
from fedtorrent.privacy.mechanism import privatize_state

State = dict[str, torch.Tensor]
MAX_NOISE_SEED = 1 << 63
"""Noise seeds are drawn in ``[0, 2**63)`` (``secrets.randbits(63)``)."""


@runtime_checkable
class PeerPrivacy(Protocol):
    """A peer's privacy state: what it spent, what one more round would cost, how to save it.

    ``unit`` names what the guarantee protects: ``"node"`` (a peer's whole dataset, update-level
    DP) or ``"example"`` (any one training example). ``state_dict()`` returns a dict whose values
    are plain JSON values or flat ``{name: tensor}`` groups (the checkpoint stores the groups in
    its safetensors file, the rest in its JSON record); ``load_state_dict`` checks every field
    (types, shapes, finiteness: it may come from a damaged file) and raises ``PrivacyError``.
    """

    unit: str
    accountant: PrivacyAccountant

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at the accountant's delta (0.0 before the first round)."""
        ...

    @property
    def noise_multiplier(self) -> float:
        """The Gaussian noise's std over the clip norm."""
        ...

    def next_epsilon(self) -> float:
        """Epsilon after one more round's releases, without recording them."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to go on after a restart (see the class docstring)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises ``PrivacyError`` on any malformed field."""
        ...


class PrivateSender:
    """The send hook ``(trained state, round) -> state to share`` of a private session.

    Implements :class:`PeerPrivacy` with ``unit == "node"``; its state is the accountant's
    history, the public reference (a tensor group) and the secret noise seed.

    Args:
        config: the session's privacy settings (update-level DP; ``dp_sgd`` is refused).
        rounds: rounds planned, to derive the noise from a target epsilon.
        initial: the session's initial state, the first reference.
        noise_seed: seeds the noise of each round. It must be secret: whoever knows it can
            subtract the noise, so a peer draws one at random (never the session's seed). It is
            saved in the peer's (private, local) checkpoint so that a round redone after a
            restart shares exactly what it would have: a fresh draw would be a second release.
    """

    unit = "node"

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
        self._noise_seed = _check_seed(noise_seed)
        self.shared: State | None = None
        """The state shared last (None before the first round, and after a restart until the
        next one: it only serves the round that shared it)."""

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at the config's delta (0.0 before the first round)."""
        return self.accountant.epsilons[-1] if self.accountant.epsilons else 0.0

    def next_epsilon(self) -> float:
        """Epsilon after one more round's release, without recording it."""
        probe = self._fresh_accountant()
        probe.load_state_dict(self.accountant.state_dict())
        return probe.record_round(noise_multiplier=self.noise_multiplier)

    def _fresh_accountant(self) -> PrivacyAccountant:
        return PrivacyAccountant(delta=self.accountant.delta, mechanism=self.accountant.mechanism)

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

    def state_dict(self) -> dict[str, Any]:
        """``accountant`` (its plain state), ``noise_seed`` (secret) and ``reference`` (tensors)."""
        return {
            "accountant": self.accountant.state_dict(),
            "noise_seed": self._noise_seed,
            "reference": {k: v.detach().clone() for k, v in self.reference.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; nothing changes unless every field checks out.

        Raises:
            PrivacyError: a missing or extra field, a seed out of range, a reference whose keys,
                shapes or dtypes differ from this sender's or that holds non-finite values, or a
                malformed accountant state.
        """
        fields = {"accountant", "noise_seed", "reference"}
        if not isinstance(state, Mapping) or set(state) != fields:
            keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise PrivacyError(
                f"update-level privacy state needs {', '.join(sorted(fields))}; got {keys}"
            )
        seed = _check_seed(state["noise_seed"])
        reference = state["reference"]
        if not isinstance(reference, Mapping) or set(reference) != set(self.reference):
            raise PrivacyError("privacy state's reference does not have this model's keys")
        for key, ref in self.reference.items():
            got = reference[key]
            if not (
                isinstance(got, torch.Tensor) and got.shape == ref.shape and got.dtype == ref.dtype
            ):
                raise PrivacyError(
                    f"privacy state's reference {key!r} is not a {ref.dtype} tensor of shape "
                    f"{tuple(ref.shape)}"
                )
            if got.is_floating_point() and not bool(torch.isfinite(got).all()):
                raise PrivacyError(f"privacy state's reference {key!r} holds NaN or infinity")
        if not isinstance(state["accountant"], Mapping):
            raise PrivacyError("privacy state's accountant is not an object")
        accountant = self._fresh_accountant()
        accountant.load_state_dict(state["accountant"])
        if not math.isclose(accountant.delta, self.accountant.delta):
            raise PrivacyError(
                f"privacy state is at delta {accountant.delta}, the session's is "
                f"{self.accountant.delta}"
            )
        self.accountant = accountant
        self._noise_seed = seed
        self.reference = {k: v.detach().clone() for k, v in reference.items()}
        self.shared = None


def _check_seed(seed: object) -> int:
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < MAX_NOISE_SEED):
        raise PrivacyError(f"noise seed must be an int in [0, 2**63), got {seed!r}")
    return seed
