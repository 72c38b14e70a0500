"""An attacked swarm of real ``fedtorrent peer`` processes: learned trust shuts sign-flippers out.

The simulator and the in-memory twin test the attacks in detail; this runs the launcher's
``--attackers K --attack KIND`` path end to end (real processes, tracker and ZeroMQ links) and reads
the swarm's ``security`` summary. The same attack under fixed averaging is the control: it wrecks
the honest peers, so the learned-trust run's accuracy is measured against a visible failure. The
plausibility screen is off in both, so that trust (not the screen) is what is tested; with it on,
these sign flips are rejected as ``implausible`` (``tests/test_extreme.py`` tests the screen).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedtorrent.metrics.records import read_records
from fedtorrent.node.swarm import SwarmConfig, peer_folder, run_swarm

PEERS = 6
ATTACKERS = 2
ROUNDS = 5
UNIFORM = 1 / PEERS
"""The weight each member gets under fixed averaging over self + 5 others."""


def _attacked_swarm(tmp_path: Path, *, mixing: str) -> dict[str, Any]:
    """Run 6 digits peers (each mixes with all others), the last two flipping their updates."""
    from fedtorrent.cli.net import create

    torrent = tmp_path / f"{mixing}.torrent"
    create(
        output=torrent,
        dataset="digits",
        model="logreg",
        nodes=PEERS,
        rounds=ROUNDS,
        cohort=PEERS - 1,
        mixing=mixing,
        plausibility=0.0,  # trust alone: the screen would reject 4x sign flips outright
    )
    config = SwarmConfig(
        torrent=torrent,
        out=tmp_path / mixing,
        peers=PEERS,
        exchange_timeout=20,
        attackers=ATTACKERS,
        attack="sign_flip",
        processes=2,  # three peers per process: the attack path is the same, imports are not
    )
    summary = run_swarm(config, timeout=80, plots=False)
    assert summary["finished"] == PEERS, summary["per_peer"]
    assert all(p["rounds_completed"] == ROUNDS for p in summary["per_peer"])
    return summary


def _last_round_weights_on_attackers(out: Path, attackers: list[str]) -> list[float]:
    """Each honest peer's last-round trust weight on each attacker, from its metrics.jsonl."""
    weights = []
    for index in range(PEERS - ATTACKERS):
        last = read_records(peer_folder(out, index) / "metrics.jsonl")[-1]
        assert last["round"] == ROUNDS and set(attackers) <= set(last["heard_from"])
        weights += [float(last["trust_weights"][a]) for a in attackers]
    return weights


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_learned_trust_shuts_out_sign_flippers_that_wreck_fixed_averaging(
    tmp_path: Path,
) -> None:
    learned = _attacked_swarm(tmp_path, mixing="learned")
    security = learned["security"]
    attackers = [f"peer-{i}" for i in range(PEERS - ATTACKERS, PEERS)]
    assert security["attackers"] == attackers and security["attack"] == "sign_flip"
    assert security["rejected"] == 0  # sign-flipped states are well-formed: trust must catch them
    assert security["weight_to_attackers"] < 0.05 < UNIFORM
    assert max(_last_round_weights_on_attackers(tmp_path / "learned", attackers)) < 0.05

    fixed = _attacked_swarm(tmp_path, mixing="fixed")
    assert fixed["security"]["weight_to_attackers"] == pytest.approx(UNIFORM, abs=1e-6)
    honest_learned = security["honest_accuracy_mean"]
    honest_fixed = fixed["security"]["honest_accuracy_mean"]
    # 10 classes: fixed averaging is pushed back to chance or below; learned trust still learns.
    assert honest_fixed < 0.3, honest_fixed
    assert honest_learned > 0.6, honest_learned
    assert honest_learned - honest_fixed > 0.3, (honest_learned, honest_fixed)
