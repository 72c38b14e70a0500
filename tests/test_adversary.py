"""Poisoning attacks: the pure functions, the simulator's scenarios and the peer's ``--attack``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedtorrent.adversary import (
    ATTACKS,
    AttackConfig,
    attack_params,
    attacker_nodes,
    flip_labels,
)
from fedtorrent.cli import app
from fedtorrent.config import DataConfig, MixingConfig, TrainConfig
from fedtorrent.errors import ConfigError
from fedtorrent.metrics.records import read_records
from fedtorrent.node.swarm import Swarm as ProcessSwarm
from fedtorrent.node.swarm import SwarmConfig, swarm_security
from fedtorrent.sim.scenario import poison_labels, weight_on_attackers
from fedtorrent.state import flatten

pytestmark = pytest.mark.timeout(60)


def _attack(kind: str, scale: float | None = None) -> torch.Tensor:
    params = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    reference = torch.tensor([[0.0, 1.0], [3.0, 4.0]])
    initial = torch.tensor([9.0, 8.0])
    return attack_params(
        AttackConfig(kind, scale),
        params,
        reference=reference,
        initial=initial,
        generator=torch.Generator().manual_seed(0),
    )


def test_each_attack_on_tiny_tensors() -> None:
    # update = params - reference = [[1, 1], [0, 1]]
    assert torch.equal(_attack("sign_flip", 2.0), torch.tensor([[-2.0, -1.0], [3.0, 2.0]]))
    assert torch.equal(_attack("sign_flip"), torch.tensor([[-4.0, -3.0], [3.0, 0.0]]))  # s = 4
    assert torch.equal(_attack("scale", 3.0), torch.tensor([[3.0, 4.0], [3.0, 7.0]]))
    assert torch.equal(_attack("free_rider"), torch.tensor([[9.0, 8.0], [9.0, 8.0]]))
    assert bool(torch.isnan(_attack("nan")).all())
    assert torch.equal(_attack("label_flip"), torch.tensor([[1.0, 2.0], [3.0, 5.0]]))
    assert torch.equal(_attack("extreme"), torch.full((2, 2), 1e10))  # the default scale
    assert torch.equal(_attack("extreme", 3e38), torch.full((2, 2), 3e38))
    mixed = _attack("extreme_mixed", 3e38)
    assert torch.equal(mixed.abs(), torch.full((2, 2), 3e38)) and bool(torch.isfinite(mixed).all())
    assert torch.equal(mixed, _attack("extreme_mixed", 3e38))  # seeded signs
    noise = _attack("noise", 0.5)
    assert noise.shape == (2, 2) and not torch.equal(noise, _attack("noise", 0.1))
    assert torch.equal(noise, _attack("noise", 0.5))  # seeded
    assert flip_labels(torch.tensor([0, 3, 9]), 10).tolist() == [9, 6, 0]


def test_attack_config_and_attackers_are_validated() -> None:
    assert set(ATTACKS) == {
        "noise", "sign_flip", "scale", "label_flip", "free_rider", "nan", "extreme", "extreme_mixed"
    }  # fmt: skip
    with pytest.raises(ConfigError, match="unknown attack"):
        AttackConfig("evil")
    with pytest.raises(ConfigError, match="takes no scale"):
        AttackConfig("nan", 2.0)
    with pytest.raises(ConfigError):
        AttackConfig("scale", math.inf)
    AttackConfig("extreme", 3.4e38)  # the largest finite float32 scale is allowed
    with pytest.raises(ConfigError, match="finite in float32"):
        AttackConfig("extreme_mixed", 3.5e38)
    assert attacker_nodes(6, 2) == [4, 5]
    with pytest.raises(ConfigError):
        attacker_nodes(3, 3)


def test_label_flip_poisons_only_the_attackers_rows() -> None:
    from fedtorrent.sim.engine import node_data
    from test_sim import _synthetic  # the simulator tests' tiny data

    x, y, xt, yt, splits = _synthetic([6, 6, 6])
    data = node_data(x_train=x, y_train=y, x_test=xt, y_test=yt, splits=splits, num_classes=3)
    poisoned = poison_labels(data, [2])
    for node in (0, 1):
        rows = poisoned.train_index[node, : int(poisoned.train_count[node])]
        assert torch.equal(poisoned.y_train[rows], data.y_train[rows])
    old = data.train_index[2, :6]
    new = poisoned.train_index[2, :6]
    assert torch.equal(poisoned.x_train[new], data.x_train[old])
    assert torch.equal(poisoned.y_train[new], 2 - data.y_train[old])
    assert torch.equal(poisoned.val_index, data.val_index)


def test_weight_on_attackers_counts_cohort_members_only() -> None:
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.0, 0.5, 0.5]])
    cohorts = torch.tensor([[False, True, True], [True, False, False], [False, True, False]])
    # Node 1 has no attacker in its cohort; node 0 gave attacker 2 weight 0.2.
    assert weight_on_attackers(weights, cohorts, honest=[0, 1], attackers=[2]) == pytest.approx(0.2)
    assert weight_on_attackers(None, cohorts, honest=[0, 1], attackers=[2]) is None


def _sign_flip_run(rule: str) -> torch.Tensor:
    from fedtorrent.config import SimConfig
    from fedtorrent.sim.scenario import Outgoing
    from test_sim import _engine

    engine, net = _engine(
        [30] * 5,
        mixing=MixingConfig(rule=rule, trust_lr=5.0, trust_steps=10, trust_batch_size=16),
        train=TrainConfig(batch_size=5, lr=0.2),
    )
    config = SimConfig(data=DataConfig(num_nodes=5), rounds=5, attack="sign_flip", attackers=2)
    engine.share = Outgoing(config, initial=flatten(net.state_dict()))
    totals = []
    for r in range(5):
        weights = engine.run_round(r)
        assert weights is not None
        totals.append(weights[:3, 3:].mean())
    return torch.stack(totals)


def test_learned_trust_drives_sign_flippers_weight_down_while_fixed_cannot() -> None:
    learned = _sign_flip_run("learned")
    fixed = _sign_flip_run("fixed")
    assert torch.allclose(fixed, torch.full_like(fixed, 0.2))  # uniform over 5 members
    assert float(learned[-1]) < 0.05, learned
    assert bool((learned < 0.2).all()), learned  # below uniform from the first round on


def test_nan_rows_are_dropped_and_counted_in_the_engine() -> None:
    from test_sim import _engine

    def share(params: torch.Tensor, round_index: int, **_: torch.Tensor) -> torch.Tensor:
        out = params.clone()
        out[2] = math.nan
        return out

    engine, _ = _engine([10] * 4, mixing=MixingConfig(rule="fixed"), share=share)
    weights = engine.run_round(0)
    assert weights is not None
    assert engine.rejected == 3  # three receivers dropped node 2's row
    assert float(weights[[0, 1, 3], 2].abs().max()) == 0.0
    assert bool(torch.isfinite(engine.params).all())


# -- the peer and the swarm --------------------------------------------------------------------


def test_free_riding_peer_shares_the_initial_state(tmp_path: Path) -> None:
    from test_peer import Recorder, Swarm, make_torrent

    swarm = Swarm(make_torrent(tmp_path, nodes=3, rounds=2), tmp_path)
    recorder = Recorder()
    peers = [
        swarm.peer(0, send_hook=recorder.hook("peer-0")),
        swarm.peer(1, send_hook=recorder.hook("peer-1")),
        swarm.peer(2, send_hook=recorder.hook("peer-2"), attack="free_rider"),
    ]
    assert swarm.run(peers) == ["done"] * 3
    initial = flatten(peers[2].initial)
    for round in (1, 2):
        assert torch.equal(flatten(recorder.shared[("peer-2", round)]), initial)
        assert not torch.equal(flatten(recorder.shared[("peer-0", round)]), initial)
    summaries = [(p.out_dir / "summary.json") for p in peers]
    security = swarm_security(
        [s.parent for s in summaries],
        [{"peer_id": p.peer_id, "test_accuracy": 0.5} for p in peers],
    )
    assert security["attackers"] == ["peer-2"] and security["attack"] == "free_rider"
    assert security["weight_to_attackers"] == pytest.approx(1 / 3)  # fixed over 3 members


def test_nan_peer_is_rejected_by_the_decoder(tmp_path: Path) -> None:
    from test_peer import Swarm, make_torrent

    swarm = Swarm(make_torrent(tmp_path, nodes=3, rounds=2), tmp_path)
    peers = [swarm.peer(0), swarm.peer(1), swarm.peer(2, attack="nan")]
    assert swarm.run(peers) == ["done"] * 3
    for peer in peers[:2]:
        records = read_records(peer.out_dir / "metrics.jsonl")
        # Rejected when first dialled, then backed off by the neighbour book (never mixed).
        assert records[0]["rejected_from"].get("peer-2") == "non_finite"
        for r in records[1:]:
            assert r["rejected_from"].get("peer-2", "non_finite") == "non_finite"
            assert "peer-2" in r["rejected_from"] or r["skipped"].get("peer-2") == "backed_off"
        assert all("peer-2" not in r["heard_from"] for r in records)
    security = swarm_security(
        [p.out_dir for p in peers], [{"peer_id": p.peer_id, "test_accuracy": 0.5} for p in peers]
    )
    assert security["rejections"].get("non_finite", 0) >= 2
    assert security["weight_to_attackers"] == 0.0


def test_peer_and_swarm_take_the_attack_flags(tmp_path: Path) -> None:
    runner = CliRunner()
    for command in ("peer", "swarm"):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert "--attack" in result.output
    result = runner.invoke(
        app,
        ["peer", str(tmp_path / "x.torrent"), "--out", str(tmp_path), "--node-index", "0",
         "--num-nodes", "2", "--attack", "evil"],
    )  # fmt: skip
    assert result.exit_code != 0 and "unknown attack" in str(result.exception or result.output)
    with pytest.raises(ConfigError, match="go together"):
        SwarmConfig(torrent=tmp_path / "x.torrent", out=tmp_path, peers=6, attackers=2)
    swarm = ProcessSwarm(
        SwarmConfig(
            torrent=tmp_path / "x.torrent", out=tmp_path, peers=4, attackers=1, attack="scale"
        )
    )
    swarm.tracker_url = "http://127.0.0.1:1/announce"
    swarm.torrent = _FakeTorrent()  # type: ignore[assignment]
    assert swarm.peer_command(3)[-2:] == ["--attack", "scale"]
    assert "--attack" not in swarm.peer_command(2)


class _FakeSession:
    class data:
        num_nodes = 4


class _FakeTorrent:
    session = _FakeSession()
