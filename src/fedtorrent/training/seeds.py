"""Independent seeds for each purpose of a run, shared by the simulator and real peers."""

from __future__ import annotations

import numpy as np


def derive_seed(seed: int, *streams: int) -> int:
    """An independent 63-bit seed for one purpose (training, trust, a round) of a run's seed.

    The simulator and a peer derive the same seed for the same node, purpose and round, which is
    what lets a swarm be checked against the simulator.
    """
    state = np.random.SeedSequence([seed, *streams]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])
