"""Independent seeds for each purpose of a run, shared by the simulator and real peers.

Every random draw of a round comes from a generator seeded by ``(run seed, stream, round, node)``
(:func:`node_generator`), with rounds counted from 0 and ``node`` the node's index (a real peer
started without one uses a hash of its id). The simulator's engine and a real peer derive the
same generator for the same node, purpose and round, so the same task and seed give them the same
batches, the same validation draws for learned trust and so the same trust weights.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    """What a seed is for; the values are part of the seed derivation, never renumber them."""

    INIT = 0
    """The initial model (the same for every node)."""
    DROPOUT = 1
    """torch's global generator while the simulator trains (dropout in vectorized models)."""
    TRAIN = 2
    """The batch order of one node's local training in one round."""
    TRUST = 3
    """One node's validation batches for learned trust and its held-out check in one round."""
    CURVES = 5
    """Which examples the simulator's learning curves score."""
    STEP = 6
    """``TrainContext.generator`` of a task's own ``train_step``."""
    ATTACK = 7
    """An attacker's random draws (noise attacks) in one round."""
    SIM_NOISE = 8
    """The simulator's privacy noise for every node in one round."""
    SIM_ATTACK = 9
    """The simulator's attackers' random draws in one round."""
    COMPRESS = 10
    """One node's stochastic rounding when it compresses its update (``state.compress``)."""
    COHORT = 11
    """One node's trust-guided cohort choice in one round (``mixing.cohort``): the simulator's
    candidate sample, then the exploration draw (a peer's candidates come from the tracker)."""
    DP_NOISE = 12
    """The simulator's DP-SGD gradient noise of one node in one round (a real peer draws its
    noise from a secret seed instead: whoever knows the seed can subtract the noise)."""
    TRUST_NOISE = 13
    """The simulator's noise of every node's private trust fit (``TrustDP``) in one round; a real
    peer salts its secret noise seed with this value instead."""


def derive_seed(seed: int, *streams: int) -> int:
    """An independent 63-bit seed for one purpose (a :class:`Stream`, a round, a node) of a seed."""
    state = np.random.SeedSequence([seed, *streams]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def node_generator(seed: int, stream: Stream, round_index: int, node: int) -> torch.Generator:
    """A CPU generator for ``stream`` of ``node`` in round ``round_index`` (0-based)."""
    return torch.Generator().manual_seed(derive_seed(seed, int(stream), round_index, node))
