"""A private peer's privacy state across restarts, and its privacy budget (``--dp-max-epsilon``).

Unit tests of ``PrivateSender.state_dict`` / ``load_state_dict`` and of the checkpoint that holds
them; in-process peers (memory transport) resumed from a round's checkpoint share exactly what
the uninterrupted run shared; real ``fedtorrent peer`` processes with a real tracker are killed
and resumed, refused at start, and stopped at their budget.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fedtorrent.config import PrivacyConfig
from fedtorrent.errors import PrivacyError, StateError
from fedtorrent.metrics.records import read_json, read_records
from fedtorrent.mixing.trust import TrustDP, trust_releases
from fedtorrent.net.torrent import load_torrent, save_torrent
from fedtorrent.node.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtorrent.privacy import PrivacyAccountant
from fedtorrent.privacy.dp_sgd import ExamplePrivacy
from fedtorrent.privacy.sender import PeerPrivacy, PrivateSender

pytestmark = pytest.mark.timeout(120)
CLIP, NOISE = 0.5, 1.0
_CLI = "from fedtorrent.cli import main; main()"


def expected_epsilons(rounds: int, noise: float = NOISE) -> list[float]:
    accountant = PrivacyAccountant(delta=1e-5)
    return [accountant.record_round(noise_multiplier=noise) for _ in range(rounds)]


def _sender(seed: int = 7) -> PrivateSender:
    initial = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    return PrivateSender(
        PrivacyConfig(clip=CLIP, noise_multiplier=NOISE), rounds=4, initial=initial,
        noise_seed=seed,
    )  # fmt: skip


def _trained(round: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(round)
    return {"w": torch.randn(3, 2), "b": torch.randn(2)}


def _run(sender: PrivateSender, rounds: range) -> list[dict[str, torch.Tensor]]:
    shares = []
    for r in rounds:
        shared = sender(_trained(r), r)
        shares.append(shared)
        sender.mixed({k: 0.5 * v for k, v in shared.items()})  # some public mix
    return shares


# -- the sender's state -----------------------------------------------------------------------


def test_a_sender_restored_from_its_state_goes_on_exactly_as_the_original() -> None:
    original = _sender(seed=7)
    _run(original, range(1, 3))
    saved = original.state_dict()
    restored = _sender(seed=99)  # a fresh process draws another seed: the saved one wins
    restored.load_state_dict(saved)
    assert isinstance(restored, PeerPrivacy) and restored.unit == "node"
    assert restored.epsilon == original.epsilon == pytest.approx(expected_epsilons(2)[-1])
    assert restored.accountant.epsilons == original.accountant.epsilons
    # The reference is the saved public one, not anything rebuilt from a true model.
    assert all(
        torch.equal(restored.reference[k], original.reference[k]) for k in saved["reference"]
    )
    assert restored.next_epsilon() == pytest.approx(expected_epsilons(3)[-1])
    assert restored.accountant.rounds == 2  # next_epsilon records nothing
    assert all(
        torch.equal(a[k], b[k])
        for a, b in zip(_run(original, range(3, 5)), _run(restored, range(3, 5)), strict=True)
        for k in a
    )
    assert restored.accountant.epsilons == pytest.approx(expected_epsilons(4))
    json.dumps({k: v for k, v in saved.items() if k != "reference"})  # the rest is plain JSON


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: s.pop("reference"), "needs accountant, noise_seed, reference"),
        (lambda s: s.pop("noise_seed"), "needs accountant, noise_seed, reference"),
        (lambda s: s["reference"].pop("b"), "this model's keys"),
        (lambda s: s["reference"].update(w=torch.zeros(2, 3)), "shape"),
        (lambda s: s["reference"].update(w=torch.zeros(3, 2, dtype=torch.float64)), "float32"),
        (lambda s: s["reference"]["b"].__setitem__(0, float("nan")), "NaN"),
        (lambda s: s.update(noise_seed=True), "noise seed"),
        (lambda s: s.update(noise_seed=-1), "noise seed"),
        (lambda s: s.update(accountant=[]), "accountant"),
        (lambda s: s["accountant"].update(mechanism="prv"), "accountant"),
        (lambda s: s["accountant"]["history"].append([float("inf"), 1.0, 1]), "noise_multiplier"),
        (lambda s: s["accountant"].update(delta=1e-3), "delta"),
    ],
)
def test_a_damaged_privacy_state_is_refused_in_one_line_and_changes_nothing(
    damage: Any, message: str
) -> None:
    sender = _sender()
    _run(sender, range(1, 3))
    state = sender.state_dict()
    damage(state)
    target = _sender(seed=5)
    before = target.state_dict()
    with pytest.raises(PrivacyError, match=message) as caught:
        target.load_state_dict(state)
    assert "\n" not in str(caught.value)
    assert target.state_dict()["noise_seed"] == before["noise_seed"] == 5
    assert target.accountant.rounds == 0


def test_the_checkpoint_keeps_the_privacy_state_tensors_in_safetensors_and_checks_them(
    tmp_path: Path,
) -> None:
    sender = _sender()
    _run(sender, range(1, 3))
    like = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    base = Checkpoint(info_hash="ab" * 32, peer_id="p", round=2, state=_trained(9))
    save_checkpoint(tmp_path, dataclasses.replace(base, privacy=sender.state_dict()))
    record = json.loads((tmp_path / "checkpoint.json").read_text())
    assert set(record["privacy"]) == {"accountant", "noise_seed"}  # tensors are not in the JSON
    fresh = _sender(seed=1)
    loaded = load_checkpoint(
        tmp_path, info_hash="ab" * 32, like=like, privacy_like=fresh.state_dict()
    )
    fresh.load_state_dict(loaded.privacy)
    assert fresh.state_dict()["noise_seed"] == 7 and fresh.epsilon == sender.epsilon
    assert all(torch.equal(fresh.reference[k], sender.reference[k]) for k in like)

    damaged = sender.state_dict()
    damaged["reference"]["w"][0, 0] = float("nan")
    save_checkpoint(tmp_path, dataclasses.replace(base, privacy=damaged))
    with pytest.raises(StateError, match="NaN"):
        load_checkpoint(tmp_path, info_hash="ab" * 32, like=like, privacy_like=fresh.state_dict())
    odd = {**fresh.state_dict(), "reference": {"w": torch.zeros(2, 3), "b": torch.zeros(2)}}
    save_checkpoint(tmp_path, dataclasses.replace(base, privacy=sender.state_dict()))
    with pytest.raises(StateError, match="shape"):
        load_checkpoint(tmp_path, info_hash="ab" * 32, like=like, privacy_like=odd)
    save_checkpoint(tmp_path, base)  # no privacy state, as before it was saved
    assert load_checkpoint(tmp_path, info_hash="ab" * 32, like=like, privacy_like=odd).privacy == {}


# -- in-process peers -------------------------------------------------------------------------


def _private_torrent(
    folder: Path, *, nodes: int, rounds: int, unit: str = "node", rule: str = "fixed"
) -> Path:
    from test_peer import make_torrent

    path = make_torrent(folder, rule=rule, nodes=nodes, cohort=nodes - 1, rounds=rounds)
    torrent = load_torrent(path)
    privacy = PrivacyConfig(clip=CLIP, noise_multiplier=NOISE, unit=unit)
    save_torrent(dataclasses.replace(torrent, session=dataclasses.replace(torrent.session,
                 privacy=privacy)), path)  # fmt: skip
    return path


_SAVED = ("checkpoint.safetensors", "checkpoint.json", "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("unit", "rule"), [("node", "fixed"), ("example", "fixed"), ("example", "learned")]
)
def test_peers_resumed_from_a_rounds_checkpoints_share_exactly_what_the_uninterrupted_run_did(
    tmp_path: Path, unit: str, rule: str
) -> None:
    """What a crash after round 2 leaves on disk, resumed, goes on bit for bit as if it had not.

    Each peer's send hook copies its checkpoint files when round 3 begins (the state a SIGKILL
    then would leave); the copies, resumed in a second swarm, share in rounds 3 and 4 exactly
    the states the first swarm shared: same reference (update-level DP), same noise seed, same
    epsilon, for both units. With learned trust under example-level DP the trust fit is private
    (its noise from the same secret seed, salted) and every round's epsilon counts its releases.
    """
    from test_peer import Recorder, Swarm

    torrent = _private_torrent(tmp_path, nodes=2, rounds=4, unit=unit, rule=rule)
    first, twin_root = Swarm(torrent, tmp_path / "run"), tmp_path / "twin"
    recorder = Recorder()

    def hook(index: int) -> Any:
        record = recorder.hook(f"peer-{index}")

        def send(state: dict[str, torch.Tensor], round: int) -> dict[str, torch.Tensor]:
            if round == 3:
                (twin_root / f"peer-{index}").mkdir(parents=True)
                for name in _SAVED:
                    shutil.copy(first.root / f"peer-{index}" / name, twin_root / f"peer-{index}")
            return record(state, round)

        return send

    settings = {"nodes": 2, "exchange_timeout": 30.0, "adaptive_deadline": False}
    peers = [first.peer(i, send_hook=hook(i), **settings) for i in range(2)]
    assert first.run(peers) == ["done"] * 2
    twin, again = Swarm(torrent, twin_root), Recorder()
    resumed = [
        twin.peer(i, send_hook=again.hook(f"peer-{i}"), resume=True, **settings) for i in range(2)
    ]
    assert twin.run(resumed) == ["done"] * 2
    assert sorted(again.shared) == [(f"peer-{i}", r) for i in range(2) for r in (3, 4)]
    for key, shared in again.shared.items():
        assert all(torch.equal(shared[k], recorder.shared[key][k]) for k in shared), key
    for peer, original in zip(resumed, peers, strict=True):
        epsilons = [r["epsilon"] for r in read_records(peer.out_dir / "metrics.jsonl")]
        assert epsilons == [r["epsilon"] for r in read_records(original.out_dir / "metrics.jsonl")]
        if unit == "node":
            assert epsilons == pytest.approx(expected_epsilons(4))
        if rule == "learned":  # training's steps and the trust fit's, every round
            assert isinstance(peer.private, ExamplePrivacy) and peer.private.trust
            session = load_torrent(torrent).session
            assert session.privacy is not None
            plan = trust_releases(
                TrustDP(session.privacy.trust_clip, session.privacy.trust_noise),
                count=len(peer.data.y_val), batch_size=session.mixing.trust_batch_size,
                steps=session.mixing.trust_steps,
            )  # fmt: skip
            assert peer.private.trust == plan
            both = ExamplePrivacy(peer.private.dp, delta=1e-5)
            alone = ExamplePrivacy(peer.private.dp, delta=1e-5)
            assert epsilons == pytest.approx([both.charge_round(plan) for _ in range(4)])
            assert epsilons[-1] > [alone.charge_round() for _ in range(4)][-1]
        assert epsilons == sorted(set(epsilons)) and epsilons[0] > 0
        assert peer.private is not None and peer.private.unit == unit
        assert all(torch.equal(peer.current[k], original.current[k]) for k in peer.current)


def test_a_private_session_refuses_to_resume_a_checkpoint_without_privacy_state(
    tmp_path: Path,
) -> None:
    from test_peer import Swarm

    torrent = _private_torrent(tmp_path, nodes=2, rounds=2)
    first = Swarm(torrent, tmp_path)
    peers = [first.peer(i, nodes=2) for i in range(2)]
    assert first.run(peers) == ["done"] * 2
    assert peers[0].private is not None
    saved = load_checkpoint(
        peers[0].out_dir, info_hash=peers[0].info_hash, like=peers[0].like,
        privacy_like=peers[0].private.state_dict(),
    )  # fmt: skip
    save_checkpoint(peers[0].out_dir, dataclasses.replace(saved, privacy={}))
    again = Swarm(torrent, tmp_path).peer(0, nodes=2, resume=True, rounds=3)
    with pytest.raises(StateError, match="no privacy state") as caught:
        again.start()
    again.close()
    assert "\n" not in str(caught.value)


# -- real peer processes ----------------------------------------------------------------------


def _create(folder: Path, url: str, *, nodes: int, rounds: int, private: bool = True) -> Path:
    from fedtorrent.cli.net import create

    path = folder / "session.torrent"
    dp: dict[str, Any] = {"dp_clip": CLIP, "dp_noise": NOISE} if private else {}
    create(
        output=path, tracker=f"{url}/announce", dataset="digits", nodes=nodes, cohort=nodes - 1,
        rounds=rounds, mixing="fixed", batch_size=32, **dp,
    )  # fmt: skip
    return path


@pytest.mark.network
@pytest.mark.slow
def test_a_killed_private_peer_resumes_with_the_epsilon_of_one_that_never_stopped(
    tmp_path: Path,
) -> None:
    import signal

    from test_peer_process import Peers, free_port, running_tracker, status, wait_for

    with running_tracker(free_port(), tmp_path / "tracker.db") as tracker:
        torrent = _create(tmp_path, tracker.url, nodes=3, rounds=5)
        peers = Peers(torrent, tmp_path, nodes=3, timeout=5.0)
        try:
            for index in range(3):
                peers.start(index)
            wait_for(lambda: peers.round(2) >= 2, timeout=60, what="peer 2 at round 2")
            peers.procs[2].send_signal(signal.SIGKILL)
            assert peers.procs[2].wait(10) == -signal.SIGKILL
            saved = json.loads((peers.folder(2) / "checkpoint.json").read_text())
            assert len(saved["privacy"]["accountant"]["epsilons"]) == saved["round"] >= 2
            peers.start(2, "--resume")
            codes = peers.wait_all(timeout=90)
        finally:
            peers.kill_all()
    assert codes == {0: 0, 1: 0, 2: 0}
    expected = expected_epsilons(5)
    for index in range(3):
        records = read_records(peers.folder(index) / "metrics.jsonl")
        assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
        assert [r["epsilon"] for r in records] == pytest.approx(expected)
        summary = read_json(peers.folder(index) / "summary.json")
        security = summary["security"]
        assert security["epsilon"] == pytest.approx(expected[-1])
        assert (security["delta"], security["privacy_unit"]) == (1e-5, "node")
        assert summary["state"] == "done" and summary["stopped"] is None
        assert status(peers.folder(index))["epsilon"] == pytest.approx(expected[-1])
    assert "resuming after round" in (peers.folder(2) / "peer.log").read_text()


def _peer(torrent: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-c", _CLI, "peer", str(torrent), "--out", str(out), "--node-index", "0",
        "--num-nodes", "2", *extra,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.network
@pytest.mark.slow
def test_a_peer_refuses_to_start_past_its_budget_in_one_line(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9"  # never reached: the refusal comes before any announce
    private = _create(tmp_path, url, nodes=2, rounds=3)
    first = expected_epsilons(1)[0]
    done = _peer(private, tmp_path / "a", "--dp-max-epsilon", repr(first * 0.9))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --dp-max-epsilon"), done.stderr
    assert "first round" in lines[0] and f"{first:.4g}" in lines[0]
    (tmp_path / "plain").mkdir()
    plain = _create(tmp_path / "plain", url, nodes=2, rounds=3, private=False)
    done = _peer(plain, tmp_path / "b", "--dp-max-epsilon", "8")
    assert done.returncode == 2 and "without differential privacy" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.network
@pytest.mark.slow
def test_a_swarm_of_private_peers_stops_cleanly_at_the_budget(tmp_path: Path) -> None:
    """``swarm --dp-max-epsilon``: both peers end after round 2 (round 3 would pass the cap)."""
    from fedtorrent.node.swarm import SwarmConfig, peer_folder, run_swarm

    torrent = _create(tmp_path, "http://127.0.0.1:9", nodes=2, rounds=4)
    epsilons = expected_epsilons(3)
    cap = (epsilons[1] + epsilons[2]) / 2
    out = tmp_path / "run"
    config = SwarmConfig(
        torrent=torrent, out=out, peers=2, exchange_timeout=10, dp_max_epsilon=cap,
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    summary = run_swarm(config, timeout=100, plots=False, progress=False)
    assert summary["finished"] == 2, summary["per_peer"]
    security = summary["security"]
    assert security["budget_stopped"] == ["peer-0", "peer-1"]
    assert security["epsilon"] == pytest.approx(epsilons[1])
    assert security["epsilon_per_peer"] == pytest.approx(
        {"peer-0": epsilons[1], "peer-1": epsilons[1]}
    )
    assert (security["delta"], security["privacy_unit"]) == (1e-5, "node")
    for index, peer in enumerate(summary["per_peer"]):
        assert peer["stopped"] == "privacy_budget" and peer["epsilon"] == pytest.approx(epsilons[1])
        folder = peer_folder(out, index)
        own = read_json(folder / "summary.json")
        assert (own["state"], own["stopped"], own["rounds_done"]) == ("done", "privacy_budget", 2)
        assert own["security"]["max_epsilon"] == pytest.approx(cap)
        assert [r["round"] for r in read_records(folder / "metrics.jsonl")] == [1, 2]
        assert "past --dp-max-epsilon" in (folder / "peer.log").read_text()
