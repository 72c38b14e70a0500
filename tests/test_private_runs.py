"""Update-level DP wired into runs: the peer's private sender and the simulator's scenario."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fedtorrent.config import DataConfig, MixingConfig, PrivacyConfig, SimConfig
from fedtorrent.metrics.records import read_json, read_records
from fedtorrent.net.torrent import load_torrent, save_torrent
from fedtorrent.privacy import PrivacyAccountant
from fedtorrent.state import flatten

pytestmark = pytest.mark.timeout(60)


def _private_torrent(folder: Path, privacy: PrivacyConfig) -> Path:
    from test_peer import make_torrent

    path = make_torrent(folder, nodes=3, rounds=2)
    torrent = load_torrent(path)
    session = dataclasses.replace(torrent.session, privacy=privacy)
    save_torrent(dataclasses.replace(torrent, session=session), path)
    return path


def test_private_peer_noises_what_it_shares_and_reports_epsilon(tmp_path: Path) -> None:
    from test_peer import Recorder, Swarm

    swarm = Swarm(
        _private_torrent(tmp_path, PrivacyConfig(clip=0.5, noise_multiplier=2.0)), tmp_path
    )
    recorder = Recorder()
    peers = [swarm.peer(i, send_hook=recorder.hook(f"peer-{i}")) for i in range(3)]
    assert swarm.run(peers) == ["done"] * 3
    expected = PrivacyAccountant(delta=1e-5)
    epsilons = [expected.record_round(noise_multiplier=2.0) for _ in range(2)]
    for peer in peers:
        records = read_records(peer.out_dir / "metrics.jsonl")
        assert [r["epsilon"] for r in records] == pytest.approx(epsilons)
        summary = read_json(peer.out_dir / "summary.json")
        assert summary["security"]["epsilon"] == pytest.approx(epsilons[-1])
        assert summary["security"]["noise_multiplier"] == 2.0
        # Round 1's share is the initial state plus a noised, clipped update: it is not what the
        # peer trained, and its distance from the initial state is noise-sized (>> the clip).
        shared = flatten(recorder.shared[(peer.peer_id, 1)])
        change = shared - flatten(peer.initial)
        assert float(change.norm()) > 2 * 0.5
        # The peer mixed its own true state; the next reference mixed its noised share instead.
        assert peer.private is not None
        assert not torch.allclose(flatten(peer.current), flatten(peer.private.reference))


def test_simulator_dp_changes_shared_rows_only_and_reports_epsilon() -> None:
    from fedtorrent.sim.scenario import Outgoing
    from test_sim import _engine

    engine, net = _engine([20] * 4, mixing=MixingConfig(rule="fixed"))
    config = SimConfig(
        data=DataConfig(num_nodes=4),
        rounds=3,
        privacy=PrivacyConfig(clip=0.1, noise_multiplier=1.5),
    )
    outgoing = Outgoing(config, initial=flatten(net.state_dict()))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def share(params: torch.Tensor, round_index: int, **kw: torch.Tensor) -> torch.Tensor:
        before = params.clone()
        shared = outgoing(params, round_index, **kw)
        assert torch.equal(params, before)  # the true rows are left alone
        seen.append((params.clone(), shared.clone()))
        return shared

    engine.share = share
    for r in range(3):
        weights = engine.run_round(r)
    assert weights is not None
    trained, shared = seen[-1]
    assert not torch.allclose(trained, shared)
    # Each node mixes its own true row: params = W @ shared + diag(W) * (trained - shared).
    expected = weights @ shared + weights.diagonal().unsqueeze(1) * (trained - shared)
    assert torch.allclose(engine.params, expected, atol=1e-5)
    # The public reference is the mix of the shared rows alone.
    assert torch.allclose(engine.public, weights @ shared, atol=1e-5)
    accountant = PrivacyAccountant(delta=1e-5)
    assert outgoing.epsilon == pytest.approx(
        [accountant.record_round(noise_multiplier=1.5) for _ in range(3)][-1]
    )
