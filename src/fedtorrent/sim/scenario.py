"""Privacy and poisoning in the simulator: what every node shares, and the run's security metric.

:class:`Outgoing` is the engine's ``share`` hook for a :class:`~fedtorrent.config.SimConfig` with
``privacy`` or an ``attack``. Honest rows are privatized like a real peer's
(:class:`~fedtorrent.privacy.sender.PrivateSender`, vectorized with ``privatize_rows``): row i
shares ``public_i + privatize(theta_i - public_i)``, where ``public_i`` is what i's cohort can
compute i held after the last mix (the mix with i's shared row as its own). The attackers' rows
are then replaced by :func:`fedtorrent.adversary.attack_params` (``label_flip`` instead poisons
their training labels: :func:`poison_labels`). Last, with ``compression``, every row goes through
its node's public copy (:class:`~fedtorrent.state.compress.PublicCopy`, the code a real peer's
sender runs): what the others receive is the copy after this round's compressed update, and the
residual carries over. Every node still mixes its own true row.

Accounting: every node releases one Gaussian mechanism per round with the same noise multiplier
at ``sample_rate = 1``, so every node's epsilon is the same and one accountant stands for all.

Example-level DP (``privacy.unit == "example"``) adds nothing to what nodes share: every node
trains with DP-SGD in the engine and keeps its own :class:`~fedtorrent.privacy.ExamplePrivacy`
(:func:`example_privacies`), whose epsilon depends on its number of training examples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedtorrent.adversary import AttackConfig, attack_params, attacker_nodes, flip_labels
from fedtorrent.config import SimConfig
from fedtorrent.mixing.trust import Release, planned_trust_releases, private_trust
from fedtorrent.privacy.accountant import PrivacyAccountant, resolve_noise_multiplier
from fedtorrent.privacy.dp_sgd import ExamplePrivacy
from fedtorrent.privacy.mechanism import privatize_rows
from fedtorrent.sim.engine import NodeData
from fedtorrent.state.compress import Compression, PublicCopy
from fedtorrent.training.seeds import Stream, node_generator

Tensor = torch.Tensor


class Outgoing:
    """The share hook ``(params, round, *, before, public) -> shared rows`` of a scenario.

    Args:
        config: the run (its ``privacy``, ``attack``, ``attackers``, ``seed`` and ``rounds``).
        initial: ``(P,)`` the initial parameters (what a free rider shares).
    """

    def __init__(self, config: SimConfig, *, initial: Tensor) -> None:
        n = config.data.num_nodes
        self.attackers = attacker_nodes(n, config.attackers)
        self.honest = [i for i in range(n) if i not in set(self.attackers)]
        self.attack = (
            AttackConfig(config.attack, config.attack_scale, start=config.attack_from)
            if config.attack is not None
            else None
        )
        self.initial = initial.detach().clone()
        self.seed = config.seed
        self.compression = Compression.parse(config.compression)
        self.copies: PublicCopy | None = None
        """Every node's public copy (``compression``), made at the first round."""
        privacy = config.privacy
        privacy = privacy if privacy is not None and privacy.update_level else None
        self.clip = privacy.clip if privacy is not None else None
        self.noise_multiplier = (
            resolve_noise_multiplier(privacy, config.rounds) if privacy is not None else None
        )
        self.accountant = (
            PrivacyAccountant(delta=privacy.delta, mechanism=privacy.accountant)
            if privacy is not None
            else None
        )

    @property
    def epsilon(self) -> float | None:
        """Epsilon every node has spent so far (None without DP)."""
        if self.accountant is None:
            return None
        return self.accountant.epsilons[-1] if self.accountant.epsilons else 0.0

    def __call__(
        self, params: Tensor, round_index: int, *, before: Tensor, public: Tensor
    ) -> Tensor:
        """What every node shares this round; ``params`` is never modified."""
        shared = params
        if self.accountant is not None:
            assert self.clip is not None and self.noise_multiplier is not None
            generator = node_generator(self.seed, Stream.SIM_NOISE, round_index, 0)
            noised = privatize_rows(
                params - public,
                clip=self.clip,
                noise_multiplier=self.noise_multiplier,
                generator=generator,
            )
            shared = public + noised
            self.accountant.record_round(noise_multiplier=self.noise_multiplier)
        attack = self.attack
        if (
            attack is not None
            and self.attackers
            and not attack.poisons_data
            and attack.active(round_index)
        ):
            rows = torch.tensor(self.attackers)
            generator = node_generator(self.seed, Stream.SIM_ATTACK, round_index, 0)
            shared = shared.clone() if shared is params else shared
            shared[rows] = attack_params(
                attack,
                params[rows],
                reference=before[rows],
                initial=self.initial,
                generator=generator,
            )
        if not self.compression.is_none:
            if self.copies is None:
                self.copies = PublicCopy(self.initial.to(params.device).repeat(len(params), 1))
            generators = [
                node_generator(self.seed, Stream.COMPRESS, round_index, node)
                for node in range(len(params))
            ]
            self.copies.update(shared, self.compression, generator=generators)
            shared = self.copies.hat.clone()
        return shared


def example_privacies(
    config: SimConfig, examples: Sequence[int], validation: Sequence[int]
) -> list[ExamplePrivacy] | None:
    """One :class:`ExamplePrivacy` per node (``examples[i]`` training examples), or None.

    None unless ``config.privacy`` is example-level. With learned trust each node's plan holds
    its private trust fit's releases on its ``validation[i]`` examples
    (:func:`~fedtorrent.mixing.trust.planned_trust_releases`), which a target epsilon covers
    too. Nodes of equal sizes share one noise derivation (searched once per pair of sizes).

    Raises:
        PrivacyError: a node without examples, no local steps, or a target that cannot be met.
    """
    privacy = config.privacy
    if privacy is None or not privacy.example_level:
        return None
    trust_dp = private_trust(privacy, config.mixing)
    made: dict[tuple[int, int], ExamplePrivacy] = {}
    out = []
    for count, held in zip(examples, validation, strict=True):
        if (count, held) not in made:
            made[count, held] = ExamplePrivacy.from_config(
                privacy, config.train, examples=count, rounds=config.rounds,
                trust=planned_trust_releases(trust_dp, config.mixing, count=held),
            )  # fmt: skip
        first = made[count, held]
        out.append(
            ExamplePrivacy(
                first.dp, delta=privacy.delta, mechanism=privacy.accountant, trust=first.trust
            )
        )
    return out


def charge_round(
    privacies: Sequence[ExamplePrivacy] | None, releases: Sequence[Sequence[Release]]
) -> None:
    """Close a round for every node: its training steps, and ``releases[i]``.

    ``releases[i]`` is what node i's private trust fit released (``Engine.releases``).
    """
    for node, private in enumerate(privacies or ()):
        private.charge_round(releases[node])


def round_epsilons(
    outgoing: Outgoing | None, privacies: Sequence[ExamplePrivacy] | None, num_nodes: int
) -> list[float] | None:
    """Every node's epsilon so far: example-level per node, update-level the same for all."""
    if privacies is not None:
        return [p.epsilon for p in privacies]
    if outgoing is not None and outgoing.epsilon is not None:
        return [outgoing.epsilon] * num_nodes
    return None


def poison_labels(data: NodeData, attackers: Sequence[int]) -> NodeData:
    """``label_flip``: the attackers train on copies of their rows with labels ``C - 1 - y``.

    The copies are appended to ``x_train``/``y_train`` and the attackers' training indices point
    at them, so honest nodes and every validation split keep the true labels.
    """
    if not attackers:
        return data
    counts = data.train_count.tolist()
    index = data.train_index.clone()
    picked = [data.train_index[a, : counts[a]] for a in attackers]
    rows = torch.cat(picked)
    start = int(data.x_train.shape[0])
    offset = start
    for a, part in zip(attackers, picked, strict=True):
        index[a, : len(part)] = torch.arange(offset, offset + len(part))
        offset += len(part)
    return dataclasses.replace(
        data,
        x_train=torch.cat([data.x_train, data.x_train[rows]]),
        y_train=torch.cat([data.y_train, flip_labels(data.y_train[rows], data.num_classes)]),
        train_index=index,
    )


def weight_on_attackers(
    weights: Tensor | None, cohorts: Tensor, *, honest: Sequence[int], attackers: Sequence[int]
) -> float | None:
    """One round's mean weight an honest node gave each attacker in its cohort.

    Averaged over honest nodes with an attacker in their cohort; None without weights (robust
    rules) or without such nodes. ``cohorts`` is the round's ``(N, N)`` adjacency (True where i
    mixes j).
    """
    if weights is None or not attackers:
        return None
    values = []
    for i in honest:
        members = [j for j in attackers if bool(cohorts[i, j])]
        if members:
            values.append(float(weights[i, members].mean()))
    return sum(values) / len(values) if values else None


EXCLUDED_WEIGHT = 0.01
"""Honest nodes' mean weight on the attackers below which they count as excluded."""


def rounds_to_exclusion(
    weights_per_round: Sequence[float | None], *, start: int, threshold: float = EXCLUDED_WEIGHT
) -> int | None:
    """How many attacked rounds it took until the weight on the attackers stays below ``threshold``.

    ``weights_per_round[r]`` is round r's :func:`weight_on_attackers` (0-based; None: no honest
    node met an attacker, which neither breaks nor starts the exclusion); the attack starts in
    round ``start``. Returns ``t`` where round ``start + t - 1`` is the first from which every
    value is below ``threshold`` (1: the very first attacked round's mix already excludes them),
    or None when the run ends before that (or no attacked round had a value).
    """
    first: int | None = None
    for r in range(start, len(weights_per_round)):
        value = weights_per_round[r]
        if value is None:
            continue
        if value >= threshold:
            first = None
        elif first is None:
            first = r
    return None if first is None else first - start + 1


def security_summary(
    final: Sequence[dict[str, Any]],
    *,
    honest: Sequence[int],
    attackers: Sequence[int],
    weights_per_round: Sequence[float | None],
    rejected: Mapping[str, int],
    epsilon: float | None,
    attack_from: int = 0,
) -> dict[str, Any]:
    """The run's security metric: accuracies, weight on attackers, rejections, epsilon.

    ``weights_per_round`` holds every round's :func:`weight_on_attackers` (None where there was
    none); ``weight_to_attackers`` is the mean of the values (None when there were none) and
    ``weight_to_attackers_per_round`` the list itself. ``rounds_to_exclusion`` is
    :func:`rounds_to_exclusion` from round ``attack_from``; ``rejected`` counts dropped
    received rows by reason (``non_finite``, ``implausible``, see
    :func:`fedtorrent.sim.run.engine_rejections`).
    """
    honest_acc = torch.tensor([float(final[i]["accuracy"]) for i in honest], dtype=torch.float64)
    attacker_acc = [float(final[i]["accuracy"]) for i in attackers]
    values = [v for v in weights_per_round if v is not None]
    return {
        "attackers": list(attackers),
        "honest_accuracy_mean": float(honest_acc.mean()),
        "honest_accuracy_std": float(honest_acc.std(unbiased=False)),
        "attacker_accuracy_mean": sum(attacker_acc) / len(attacker_acc) if attacker_acc else None,
        "weight_to_attackers": sum(values) / len(values) if values else None,
        "weight_to_attackers_per_round": list(weights_per_round),
        "attack_from": attack_from,
        "rounds_to_exclusion": (
            rounds_to_exclusion(weights_per_round, start=attack_from) if attackers else None
        ),
        "rejected": {reason: count for reason, count in rejected.items() if count},
        "epsilon": epsilon,
    }
