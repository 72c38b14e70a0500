"""Trust-guided cohorts, trust decay and the delayed attacker, in the simulator and the peer."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fedtorrent.adversary import AttackConfig
from fedtorrent.config import (
    DataConfig,
    MixingConfig,
    ModelConfig,
    SimConfig,
    TopologyConfig,
    TrainConfig,
)
from fedtorrent.errors import ConfigError
from fedtorrent.mixing.cohort import CANDIDATE_FACTOR, exploit_count, trust_cohort
from fedtorrent.mixing.trust import TrustLearner, decay_logits
from fedtorrent.node.neighbours import BookSettings, Candidate, NeighbourBook, TrustChoice
from fedtorrent.sim.scenario import Outgoing, rounds_to_exclusion, security_summary
from fedtorrent.sim.topology import Topology, trust_guided_cohorts
from fedtorrent.training.seeds import Stream, node_generator

pytestmark = pytest.mark.timeout(120)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- the one cohort choice ----------------------------------------------------------------------


def test_exploit_count_rounds_halves_up() -> None:
    assert [exploit_count(3, e) for e in (0.0, 0.2, 1 / 3, 0.5, 1.0)] == [3, 2, 2, 2, 0]
    assert exploit_count(4, 0.25) == 3 and exploit_count(2, 0.25) == 2
    with pytest.raises(ConfigError):
        exploit_count(3, 1.5)


def test_exploitation_picks_the_highest_trust_among_seen_candidates() -> None:
    logits = [0.5, None, 2.0, -1.0, None, 1.0, None, 3.0]
    picked = trust_cohort(logits, size=3, explore=0.0, generator=_gen())
    assert picked == [7, 2, 5]  # highest first; unseen candidates never exploited
    # Ties go to the earlier candidate.
    assert trust_cohort([1.0, 1.0, 1.0, 0.0], size=2, explore=0.0, generator=_gen()) == [0, 1]


def test_the_exploration_share_is_respected_and_draws_from_the_others() -> None:
    logits: list[float | None] = [float(i) for i in range(10)] + [None] * 10
    for explore, trusted in ((0.0, 4), (0.25, 3), (0.5, 2), (1.0, 0)):
        for seed in range(20):
            picked = trust_cohort(logits, size=4, explore=explore, generator=_gen(seed))
            assert len(set(picked)) == 4
            assert picked[:trusted] == [9, 8, 7, 6][:trusted]
            # The explored members come from the rest, seen or not; never the trusted ones twice.
            assert not set(picked[trusted:]) & set(range(10 - trusted, 10))
    # With e = 1 every member is a random draw: over seeds, unseen candidates are met too.
    draws = [trust_cohort(logits, size=4, explore=1.0, generator=_gen(s)) for s in range(30)]
    met = {i for draw in draws for i in draw}
    assert met & set(range(10, 20)) and met & set(range(6))


def test_the_choice_is_deterministic_per_seed_and_takes_all_of_few_candidates() -> None:
    logits: list[float | None] = [None, 0.3, None, 0.1, None, None, 0.2]
    first = trust_cohort(logits, size=3, explore=0.5, generator=_gen(4))
    assert first == trust_cohort(logits, size=3, explore=0.5, generator=_gen(4))
    draws = {tuple(trust_cohort(logits, size=3, explore=0.5, generator=_gen(s))) for s in range(20)}
    assert len(draws) > 1  # the exploration part moves with the seed
    assert trust_cohort([None, 1.0], size=3, explore=0.5, generator=_gen()) == [0, 1]
    assert trust_cohort([], size=3, explore=0.5, generator=_gen()) == []


# -- decay --------------------------------------------------------------------------------------


def test_decay_moves_unheard_logits_towards_the_prior_only() -> None:
    logits = torch.tensor([[1.0, 4.0, -2.0], [0.5, 0.0, 8.0]])
    heard = torch.tensor([[True, True, False], [True, False, False]])
    out = decay_logits(logits, heard, 0.25)
    assert torch.allclose(out, torch.tensor([[1.0, 4.0, -1.5], [0.5, 0.0, 6.0]]))
    assert decay_logits(logits, heard, 0.0) is logits


def test_a_peers_learner_decays_the_peers_it_did_not_hear() -> None:
    learner = TrustLearner(MixingConfig(rule="learned", trust_decay=0.5))
    learner.remember(["a", "b"], torch.tensor([1.0, 4.0, -2.0]), excluded=[], check=None)
    learner.remember(["a"], torch.tensor([1.0, 3.0]), excluded=[], check=None)
    assert learner.known() == {"a": 3.0, "b": -1.0}
    learner.remember([], torch.tensor([1.0]), excluded=[], check=None)
    assert learner.known() == {"a": 1.5, "b": -0.5}
    plain = TrustLearner(MixingConfig(rule="learned"))
    plain.remember(["a", "b"], torch.tensor([1.0, 4.0, -2.0]), excluded=[], check=None)
    plain.remember(["a"], torch.tensor([1.0, 3.0]), excluded=[], check=None)
    assert plain.known() == {"a": 3.0, "b": -2.0}  # default: no decay


def test_settings_are_validated_and_default_off() -> None:
    assert MixingConfig().trust_cohorts is None and MixingConfig().trust_decay == 0.0
    with pytest.raises(ConfigError, match="learned"):
        MixingConfig(rule="fixed", trust_cohorts=0.2)
    with pytest.raises(ConfigError, match="trust_decay"):
        MixingConfig(trust_decay=1.0)
    with pytest.raises(ConfigError, match="exploration share"):
        MixingConfig(trust_cohorts=-0.1)
    with pytest.raises(ConfigError, match="random_cohort"):
        SimConfig(mixing=MixingConfig(trust_cohorts=0.2))


def test_the_torrent_carries_the_settings_and_leaves_old_ones_alone() -> None:
    from fedtorrent.net.torrent import _decode_fields, _encode_fields

    assert b"trust_cohorts" not in _encode_fields(MixingConfig())
    assert b"trust_decay" not in _encode_fields(MixingConfig())
    mixing = MixingConfig(trust_cohorts=0.25, trust_decay=0.1)
    assert _decode_fields(MixingConfig, _encode_fields(mixing), "mixing") == mixing


# -- the simulator's cohorts ----------------------------------------------------------------------


def test_trust_guided_cohorts_pick_trusted_candidates_from_a_sample() -> None:
    n, k = 24, 3
    logits = torch.randn(n, n, generator=_gen(1))
    seen = torch.ones(n, n, dtype=torch.bool)
    adjacency = trust_guided_cohorts(logits, seen, size=k, explore=0.0, seed=3, round_index=2)
    assert adjacency.sum(dim=1).tolist() == [k] * n and not bool(adjacency.diagonal().any())
    for node in (0, 7, 23):  # node i's pool: CANDIDATE_FACTOR k nodes from its own generator
        draw = torch.randperm(n - 1, generator=node_generator(3, Stream.COHORT, 2, node))
        pool = [j + (j >= node) for j in draw[: CANDIDATE_FACTOR * k].tolist()]
        best = sorted(pool, key=lambda j: -float(logits[node, j]))[:k]
        assert set(adjacency[node].nonzero().flatten().tolist()) == set(best)
    # Nobody seen: every member is an exploration draw, still k distinct others.
    fresh = trust_guided_cohorts(logits, ~seen, size=k, explore=0.0, seed=3, round_index=2)
    assert fresh.sum(dim=1).tolist() == [k] * n and not bool(fresh.diagonal().any())


def test_topology_keeps_the_round_it_drew_and_needs_logits_for_a_new_one() -> None:
    config = TopologyConfig(kind="random_cohort", degree=2)
    topology = Topology(config, num_nodes=10, seed=0, explore=0.5)
    assert topology.trust_guided and topology.changes_each_round
    with pytest.raises(ConfigError, match="trust logits"):
        topology.cohorts(0)
    logits, seen = torch.zeros(10, 10), torch.zeros(10, 10, dtype=torch.bool)
    drawn = topology.cohorts(0, logits=logits, seen=seen)
    assert torch.equal(topology.cohorts(0), drawn)
    with pytest.raises(ConfigError, match="random_cohort"):
        Topology(TopologyConfig(kind="ring"), num_nodes=5, seed=0, explore=0.5)
    plain = Topology(config, num_nodes=10, seed=0)
    assert torch.equal(plain.cohorts(4), plain.cohorts(4))  # default: today's random cohorts


def _digits(nodes: int, **changes: object) -> SimConfig:
    config = SimConfig(
        data=DataConfig(dataset="digits", num_nodes=nodes, split="noniid", alpha=0.3),
        model=ModelConfig(name="logreg"),
        train=TrainConfig(batch_size=32, lr=0.1),
        topology=TopologyConfig(kind="random_cohort", degree=3),
        mixing=MixingConfig(trust_steps=3, trust_batch_size=32),
        rounds=4,
    )
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


def test_simulate_with_trust_guided_cohorts_on_twelve_nodes(tmp_path: Path) -> None:
    from fedtorrent.data.datasets import load_dataset
    from fedtorrent.sim.run import run_one, simulate

    mixing = MixingConfig(trust_steps=3, trust_batch_size=32, trust_cohorts=0.34, trust_decay=0.1)
    config = _digits(12, mixing=mixing)
    outcomes, summary = simulate([config], out_dir=tmp_path, plots=False, progress=False)
    assert len(outcomes[0].final) == 12 and summary["by_mixing"]["learned"]["accuracy_mean"] > 0
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["by_mixing"]["learned"]["runs"] == 1
    weights = torch.tensor(outcomes[0].weights)
    assert ((weights > 0).sum(dim=1) <= 4).all()  # self plus a cohort of 3
    again = run_one(config, dataset=load_dataset("digits"))
    assert again.accuracies == outcomes[0].accuracies  # a seed fixes trust-guided cohorts too


# -- the delayed attacker -----------------------------------------------------------------------


def test_attack_from_validation() -> None:
    assert AttackConfig("sign_flip", start=3).active(3) and not AttackConfig(
        "sign_flip", start=3
    ).active(2)
    with pytest.raises(ConfigError, match="label_flip"):
        AttackConfig("label_flip", start=2)
    with pytest.raises(ConfigError, match=">= 0"):
        AttackConfig("noise", start=-1)
    with pytest.raises(ConfigError, match="attack_from"):
        SimConfig(attack_from=2)


def test_an_attacker_behaves_honestly_before_its_first_round() -> None:
    config = SimConfig(
        data=DataConfig(num_nodes=4), rounds=6, attack="sign_flip", attackers=1, attack_from=2
    )
    outgoing = Outgoing(config, initial=torch.zeros(3))
    params, before = torch.randn(4, 3, generator=_gen(2)), torch.randn(4, 3, generator=_gen(3))
    for round_index in (0, 1):
        shared = outgoing(params, round_index, before=before, public=before)
        assert torch.equal(shared, params)
    shared = outgoing(params, 2, before=before, public=before)
    assert torch.equal(shared[:3], params[:3])
    assert torch.allclose(shared[3], before[3] - 4.0 * (params[3] - before[3]))


def test_rounds_to_exclusion_counts_attacked_rounds_until_the_weight_stays_low() -> None:
    per_round: list[float | None] = [0.3, 0.3, 0.25, 0.05, 0.004, None, 0.02, 0.003, 0.001]
    assert rounds_to_exclusion(per_round, start=2) == 6  # round 7 on: below 0.01 for good
    assert rounds_to_exclusion([0.3, 0.005, 0.001], start=1) == 1
    assert rounds_to_exclusion([0.3, 0.2, 0.1], start=1) is None
    assert rounds_to_exclusion([0.3, None, None], start=1) is None
    final = [{"accuracy": 0.9}, {"accuracy": 0.8}, {"accuracy": 0.1}]
    summary = security_summary(
        final, honest=[0, 1], attackers=[2], weights_per_round=per_round, rejected={},
        epsilon=None, attack_from=2,
    )  # fmt: skip
    assert summary["rounds_to_exclusion"] == 6 and summary["attack_from"] == 2
    assert summary["weight_to_attackers_per_round"] == per_round
    assert summary["weight_to_attackers"] == pytest.approx(sum(v for v in per_round if v) / 8)


def test_simulate_reports_rounds_to_exclusion_for_a_delayed_attacker(tmp_path: Path) -> None:
    from fedtorrent.sim.run import simulate

    config = _digits(
        6, topology=TopologyConfig(), rounds=6, attack="sign_flip", attackers=1, attack_from=2,
    )  # fmt: skip
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, split="iid"))
    _, summary = simulate([config], out_dir=tmp_path, plots=False, progress=False)
    security = summary["by_mixing"]["learned"]["security"]
    per_round = security["weight_to_attackers_per_round"]
    assert len(per_round) == 6 and security["attack_from"] == 2
    assert min(per_round[:2]) > 0.1  # honest rounds (iid): trusted like anyone, about 1/6
    assert max(per_round[3:]) < 0.05, per_round  # once it attacks, learned trust shuts it out
    assert security["rounds_to_exclusion"] == rounds_to_exclusion(per_round, start=2)


# -- the peer's side ----------------------------------------------------------------------------


def _cand(name: str) -> Candidate:
    return Candidate(name, f"tcp://10.0.0.1:{abs(hash(name)) % 60000 + 1}", "ab" * 32)


def test_a_peers_book_chooses_by_the_same_function() -> None:
    book = NeighbourBook()
    everyone = [_cand(f"p{i}") for i in range(8)]
    book.record(1, {c.peer_id: "fresh" for c in everyone[:5]}, everyone[:5])
    book.record(1, {"p5": "timeout"}, everyone[5:6])  # backed off: never chosen
    logits = {"p0": -1.0, "p1": 2.0, "p2": 0.5, "p3": 3.0, "p4": 0.0, "p5": 9.0}
    listed = [everyone[i] for i in (6, 2, 0, 5, 7, 4, 3, 1)]
    choice = TrustChoice(logits, 1 / 3, _gen(5))
    plan = book.plan(listed, round=2, cohort_size=3, by_trust=choice)
    # The book's order without trust: good listed ones, then unknown, then the rest.
    ordered = [c.peer_id for c in book.plan(listed, round=2, cohort_size=8).cohort]
    expected = trust_cohort(
        [logits.get(p) for p in ordered], size=3, explore=1 / 3, generator=_gen(5)
    )
    assert [c.peer_id for c in plan.cohort] == [ordered[i] for i in expected]
    assert [c.peer_id for c in plan.cohort][:2] == ["p3", "p1"]  # the two most trusted
    assert plan.skipped == {"p5": "backed_off"}
    assert {c.peer_id for c in plan.cohort + plan.reserve} == set(ordered)
    assert BookSettings().numwant_factor == CANDIDATE_FACTOR


def test_select_cohort_passes_trust_to_the_book() -> None:
    from fedtorrent.net.identity import PeerIdentity
    from fedtorrent.net.tracker.client import PeerAddress
    from fedtorrent.node.exchange import TcpAddressing, select_cohort

    key = PeerIdentity.generate().public_key_hex
    listed = [PeerAddress(f"p{i}", "127.0.0.1", 7000 + i, key) for i in range(6)]
    logits = {"p4": 5.0, "p2": 4.0}
    selection = select_cohort(
        listed, peer_id="me", cohort_size=2, allowed=(), addressing=TcpAddressing(),
        book=NeighbourBook(), round=1, by_trust=TrustChoice(logits, 0.0, _gen()),
    )  # fmt: skip
    assert [e.peer_id for e in selection.cohort] == ["p4", "p2"]


def test_a_peer_swarm_with_trust_guided_cohorts_and_a_delayed_attacker(tmp_path: Path) -> None:
    from fedtorrent.metrics.records import read_records
    from fedtorrent.state import flatten
    from test_peer import Recorder, Swarm, make_torrent

    torrent = make_torrent(
        tmp_path, rule="learned", nodes=4, cohort=2, rounds=3, trust_cohorts=0.5, trust_decay=0.2
    )
    swarm = Swarm(torrent, tmp_path)
    recorder = Recorder()
    peers = [swarm.peer(i, nodes=4, send_hook=recorder.hook(f"peer-{i}")) for i in range(3)]
    peers.append(
        swarm.peer(
            3, nodes=4, send_hook=recorder.hook("peer-3"), attack="free_rider", attack_from=1
        )
    )
    assert swarm.run(peers) == ["done"] * 4
    assert peers[0].session.mixing.trust_cohorts == 0.5
    initial = flatten(peers[3].initial)
    assert not torch.equal(flatten(recorder.shared[("peer-3", 1)]), initial)  # honest round 1
    for round in (2, 3):
        assert torch.equal(flatten(recorder.shared[("peer-3", round)]), initial)
    for peer in peers:
        records = read_records(peer.out_dir / "metrics.jsonl")
        assert [r["round"] for r in records] == [1, 2, 3]
        assert all(1 <= r["cohort_size"] <= 3 for r in records)
    with pytest.raises(ConfigError, match="needs an attack"):
        swarm.peer(0, nodes=4, attack_from=2)
