"""The learning-rate schedule across rounds, shared by the simulator and real peers.

Both must apply the same factor in the same round, or a swarm stops matching its simulation.
"""

from __future__ import annotations

import math

from fedtorrent.config import LR_SCHEDULES
from fedtorrent.errors import ConfigError


def round_lr_scale(schedule: str, round_index: int, rounds: int) -> float:
    """Factor on the local learning rate in round ``round_index`` (0-based) of ``rounds``.

    ``constant`` is always 1; ``cosine`` is 1 in round 0 and decays towards 0 (never reaching it:
    the last round gets ``0.5 * (1 + cos(pi * (rounds - 1) / rounds))``). Rounds past the last
    (a peer told to run longer than its session) keep the last round's factor.

    Raises:
        ConfigError: an unknown schedule, ``rounds < 1`` or ``round_index < 0``.
    """
    if schedule not in LR_SCHEDULES:
        raise ConfigError(
            f"round schedule must be one of {', '.join(LR_SCHEDULES)}; got {schedule!r}"
        )
    if rounds < 1 or round_index < 0:
        raise ConfigError(f"need rounds >= 1 and round_index >= 0, got {round_index} of {rounds}")
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(round_index, rounds - 1) / rounds))
    return 1.0
