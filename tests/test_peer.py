"""The peer's protocol logic on the in-memory transport twin, with the tracker's real registry.

No sockets: peers run in threads of this process, reach each other through a ``MemoryNetwork``
and find each other through ``SwarmRegistry`` (the tracker's own swarm logic) behind a tiny
in-process announcer that answers exactly as the HTTP client would.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedtorrent.config import (
    DataConfig,
    MixingConfig,
    ModelConfig,
    TopologyConfig,
    TrackerConfig,
    TrainConfig,
)
from fedtorrent.errors import ConfigError, DataError, MessageError, StateError, TorrentError
from fedtorrent.metrics.records import read_records
from fedtorrent.mixing.rules import mix
from fedtorrent.models import build_model
from fedtorrent.net import wire
from fedtorrent.net.identity import PeerIdentity, new_nonce, sign_update
from fedtorrent.net.torrent import Session, Torrent, load_torrent, save_torrent, state_path_for
from fedtorrent.net.tracker.client import PeerAddress, TrackerAnswer, parse_answer
from fedtorrent.net.tracker.registry import Announce, SwarmRegistry
from fedtorrent.net.transport import (
    Endpoint,
    MemoryNetwork,
    MemoryTransport,
    Reply,
    TransportConfig,
)
from fedtorrent.node.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtorrent.node.peer import Peer, PeerConfig, read_examples
from fedtorrent.state import encode_state, flatten, state_digest

pytestmark = pytest.mark.timeout(60)
State = dict[str, torch.Tensor]


# -- fixtures -------------------------------------------------------------------------------------


def make_torrent(
    folder: Path,
    *,
    rule: str = "fixed",
    nodes: int = 3,
    cohort: int = 2,
    rounds: int = 3,
    round_schedule: str = "constant",
    plausibility: float = MixingConfig.plausibility,
    trust_margin: float = MixingConfig.trust_margin,
    compression: str | None = None,
    skip_below: float = MixingConfig.skip_below,
    skip_after: int = MixingConfig.skip_after,
    trust_cohorts: float | None = None,
    trust_decay: float = 0.0,
) -> Path:
    """A digits / logreg session (fast: ~200 examples per peer) and its initial state."""
    torch.manual_seed(0)
    net = build_model("logreg", input_shape=(1, 8, 8), num_classes=10)
    state = encode_state(net.state_dict())
    session = Session(
        name="test-digits",
        model=ModelConfig("logreg", {}),
        data=DataConfig(dataset="digits", num_nodes=nodes, seed=0),
        train=TrainConfig(epochs=1, batch_size=32, lr=0.1, seed=0),
        mixing=MixingConfig(
            rule=rule,
            trust_steps=3,
            trust_batch_size=32,
            plausibility=plausibility,
            trust_margin=trust_margin,
            skip_below=skip_below,
            skip_after=skip_after,
            trust_cohorts=trust_cohorts,
            trust_decay=trust_decay,
        ),
        rounds=rounds,
        round_schedule=round_schedule,
        cohort_size=cohort,
        compression=None if compression is None else {"codec": compression},
        state_sha256=state_digest(state),
        state_size=len(state),
    )
    path = folder / "session.torrent"
    save_torrent(Torrent(announce="http://127.0.0.1:9/announce", session=session), path)
    state_path_for(path).write_bytes(state)
    return path


class RegistryAnnouncer:
    """The tracker's swarm registry behind the announce signature of ``TrackerClient``.

    Like the client, it replays the last answer (``cached``) while ``down`` is set.
    """

    def __init__(self, *, interval: int = 30) -> None:
        self.registry = SwarmRegistry(
            TrackerConfig(interval=interval), clock=time.monotonic, rng=random.Random(0)
        )
        self.lock = threading.Lock()
        self.down = False
        self.calls: list[dict[str, Any]] = []
        self.cache: dict[tuple[str, str], TrackerAnswer] = {}
        """Per peer, as each peer has its own client."""

    def announce(self, info_hash: str, peer_id: str, **kw: Any) -> TrackerAnswer:
        from fedtorrent.errors import TrackerError

        with self.lock:
            self.calls.append({"peer_id": peer_id, "answered": not self.down, **kw})
            if self.down:
                if (info_hash, peer_id) in self.cache and kw.get("event") != "stopped":
                    return replace(self.cache[(info_hash, peer_id)], cached=True)
                raise TrackerError("tracker down (test)")
            answer = self.registry.announce(
                Announce(
                    info_hash=info_hash,
                    peer_id=peer_id,
                    ip="127.0.0.1",
                    port=kw["port"],
                    source="127.0.0.1",
                    event=kw.get("event", ""),
                    round=kw.get("round", 0),
                    numwant=kw.get("numwant") or 20,
                    accuracy=kw.get("accuracy"),
                    pubkey=kw.get("pubkey"),
                )
            )
            parsed = parse_answer(answer.to_json())
            self.cache[(info_hash, peer_id)] = parsed
        return parsed


class MemAddressing:
    """``mem://N`` is announced as port ``N + 1``."""

    def port_of(self, address: str) -> int:
        return int(address.removeprefix("mem://")) + 1

    def endpoint(self, peer: PeerAddress) -> Endpoint:
        return Endpoint(peer_id=peer.peer_id, address=f"mem://{peer.port - 1}")


class Swarm:
    """Peers of one session on one memory network, started and run in threads."""

    def __init__(self, torrent: Path, root: Path) -> None:
        self.torrent, self.root = torrent, root
        self.network = MemoryNetwork()
        self.tracker = RegistryAnnouncer()
        self.peers: list[Peer] = []

    def peer(self, index: int, *, nodes: int = 3, **overrides: Any) -> Peer:
        hooks = {k: overrides.pop(k) for k in ("send_hook", "receive_hook") if k in overrides}
        config = PeerConfig(
            torrent=self.torrent,
            out_dir=self.root / f"peer-{index}",
            node_index=index,
            num_nodes=nodes,
            exchange_timeout=overrides.pop("exchange_timeout", 5.0),
            linger=overrides.pop("linger", 0.5),
            **overrides,
        )
        peer = Peer(
            config,
            transport=lambda cfg: MemoryTransport(self.network, cfg),
            tracker=self.tracker,
            addressing=MemAddressing(),
            **hooks,
        )
        self.peers.append(peer)
        return peer

    def run(self, peers: Sequence[Peer]) -> list[str]:
        outcomes: dict[int, str] = {}
        errors: list[BaseException] = []

        def go(i: int, peer: Peer) -> None:
            try:
                outcomes[i] = peer.run()
            except BaseException as exc:
                errors.append(exc)

        for peer in peers:
            peer.start()
        threads = [threading.Thread(target=go, args=(i, p)) for i, p in enumerate(peers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(50)
        for peer in peers:
            peer.close()
        assert not errors, errors
        return [outcomes[i] for i in range(len(peers))]


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[Swarm]:
    torch.manual_seed(0)
    running = Swarm(make_torrent(tmp_path), tmp_path)
    yield running
    for peer in running.peers:
        peer.close()


class Recorder:
    """A send hook that remembers what each peer shared in each round."""

    def __init__(self) -> None:
        self.shared: dict[tuple[str, int], State] = {}
        self.lock = threading.Lock()

    def hook(self, name: str) -> Callable[[State, int], State]:
        def send(state: State, round: int) -> State:
            with self.lock:
                self.shared[(name, round)] = {k: v.clone() for k, v in state.items()}
            return state

        return send


# -- mixing follows the simulator's rules ---------------------------------------------------------


def test_fixed_rule_averages_the_cohort_like_the_simulator(swarm: Swarm) -> None:
    recorder = Recorder()
    peers = [swarm.peer(i, send_hook=recorder.hook(f"peer-{i}")) for i in range(3)]
    assert swarm.run(peers) == ["done"] * 3
    for peer in peers:
        records = read_records(peer.out_dir / "metrics.jsonl")
        assert [r["round"] for r in records] == [1, 2, 3]
        last = records[-1]
        assert sorted(last["heard_from"]) == sorted(p.peer_id for p in peers if p is not peer)
        assert last["staleness"] == {p: 0 for p in last["heard_from"]}
        assert last["trust_weights"]["self"] == pytest.approx(1 / 3)
        # Every cohort is the whole swarm, so after the last round each peer holds the uniform
        # average of the three trained states of that round: the simulator's fixed rule.
        trained = torch.stack([flatten(recorder.shared[(p.peer_id, 3)]) for p in peers])
        expected = mix(torch.full((3,), 1 / 3), trained)
        assert torch.allclose(flatten(peer.current), expected, atol=1e-6)
        assert last["bytes_received"] > 2 * peer.session.state_size  # two payloads at least
        assert last["payload_bytes_received"] >= 2 * peer.session.state_size
        assert last["header_bytes_received"] > 0
        assert set(last["rtts"]) == set(last["heard_from"])
    accuracies = [read_records(p.out_dir / "metrics.jsonl")[-1]["test_accuracy"] for p in peers]
    assert min(accuracies) > 0.5  # 10 classes: learning happened


def test_learned_trust_mixes_with_the_weights_it_records(tmp_path: Path) -> None:
    swarm = Swarm(make_torrent(tmp_path, rule="learned"), tmp_path)
    recorder = Recorder()
    peers = [swarm.peer(i, send_hook=recorder.hook(f"peer-{i}")) for i in range(3)]
    assert swarm.run(peers) == ["done"] * 3
    for peer in peers:
        last = read_records(peer.out_dir / "metrics.jsonl")[-1]
        weights = last["trust_weights"]
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-5)
        order = ["self", *last["heard_from"]]
        names = [peer.peer_id, *last["heard_from"]]
        stack = torch.stack([flatten(recorder.shared[(n, 3)]) for n in names])
        expected = mix(torch.tensor([weights[k] for k in order]), stack)
        assert torch.allclose(flatten(peer.current), expected, atol=1e-5)
        assert peer.trust is not None
        logits = peer.trust.state_dict()
        assert set(logits["peers"]) == set(last["heard_from"])


def test_honest_peers_stop_fetching_an_attacker_their_trust_shuts_out(tmp_path: Path) -> None:
    # peer-2 shares Gaussian noise; the screen is off, so learned trust alone must catch it.
    torrent = make_torrent(
        tmp_path, rule="learned", rounds=9, plausibility=0.0, skip_below=0.05, skip_after=2
    )
    swarm = Swarm(torrent, tmp_path)
    peers = [swarm.peer(0), swarm.peer(1), swarm.peer(2, attack="noise")]
    assert swarm.run(peers) == ["done"] * 3
    payload = len(encode_state(peers[0].current))  # what one state costs on the wire
    for peer in peers[:2]:
        records = read_records(peer.out_dir / "metrics.jsonl")
        honest = "peer-1" if peer.peer_id == "peer-0" else "peer-0"
        dialled = ["peer-2" in r["cohort"] for r in records]
        assert all(honest in r["heard_from"] for r in records)  # never skipped
        first = dialled.index(False)
        # Before: mixed each round, the last two with weights below 0.05. Then: skipped for two
        # rounds, probed once (still low), skipped for two rounds again, and so on.
        assert first >= 2 and all(dialled[:first])
        assert all(records[i]["trust_weights"]["peer-2"] < 0.05 for i in (first - 2, first - 1))
        probes = [(i - first) % 3 == 2 for i in range(first, len(records))]
        assert dialled[first:] == probes
        for record, fetched in zip(records[first:], probes, strict=True):
            if fetched:
                assert record["skipped_low_trust"] == [] and record["bytes_saved"] == 0
                assert record["trust_weights"]["peer-2"] < 0.05
                continue
            assert record["skipped_low_trust"] == ["peer-2"]
            assert record["skipped"]["peer-2"] == "low_trust"
            assert record["bytes_saved"] == payload > 0
            assert record["cohort"] == [honest]  # the slot was not refilled
            assert record["neighbours"]["skipped"] == {"low_trust": 1}
        summary = json.loads((peer.out_dir / "summary.json").read_text())
        saved = sum(r["bytes_saved"] for r in records)
        assert summary["neighbours"]["bytes_saved"] == saved >= 2 * payload
        assert summary["neighbours"]["candidates_skipped"] == {"low_trust": dialled.count(False)}
        assert peer.trust is not None and "peer-2" in peer.trust.state_dict()["peers"]
    # The attacker runs learned trust too and trusts the honest peers: it skips nobody.
    attacker = read_records(peers[2].out_dir / "metrics.jsonl")
    assert all(r["skipped_low_trust"] == [] for r in attacker)


def test_none_rule_keeps_its_own_model(tmp_path: Path) -> None:
    alone = Swarm(make_torrent(tmp_path, rule="none"), tmp_path)
    recorder = Recorder()
    peers = [alone.peer(i, send_hook=recorder.hook(f"peer-{i}")) for i in range(3)]
    alone.run(peers)
    for peer in peers:
        assert torch.equal(flatten(peer.current), flatten(recorder.shared[(peer.peer_id, 3)]))


def test_the_local_lr_follows_the_sessions_round_schedule_like_the_simulator(
    tmp_path: Path,
) -> None:
    from fedtorrent.training import round_lr_scale, train_local
    from fedtorrent.training.seeds import Stream, node_generator

    rounds = 3
    swarm = Swarm(
        make_torrent(
            tmp_path, rule="none", nodes=2, cohort=1, rounds=rounds, round_schedule="cosine"
        ),
        tmp_path,
    )
    recorder = Recorder()
    peers = [swarm.peer(i, nodes=2, send_hook=recorder.hook(f"peer-{i}")) for i in range(2)]
    assert swarm.run(peers) == ["done"] * 2
    train = peers[0].session.train
    # The simulator's round_index is 0-based; the peer's rounds count from 1.
    expected = [train.lr * round_lr_scale("cosine", r, rounds) for r in range(rounds)]
    assert expected[0] == train.lr > expected[1] > expected[2] > 0
    for peer in peers:
        records = read_records(peer.out_dir / "metrics.jsonl")
        assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-12)
        # The rate is applied, not only recorded: replaying each round's training at that rate
        # from the previous state gives exactly what the peer shared (rule none keeps its own).
        state = peer.initial
        for r, lr in enumerate(expected, start=1):
            model = build_model("logreg", input_shape=(1, 8, 8), num_classes=10)
            model.load_state_dict(state)
            train_local(
                model, peer.data.x_train, peer.data.y_train, replace(train, lr=lr),
                generator=node_generator(peer.seed, Stream.TRAIN, r - 1, peer._salt),
            )  # fmt: skip
            state = recorder.shared[(peer.peer_id, r)]
            assert torch.allclose(flatten(model.state_dict()), flatten(state), atol=1e-6)


@pytest.mark.parametrize(
    ("rule", "margin", "codec"),
    [
        ("learned", 0.0, None),
        ("learned", 0.01, None),
        ("learned", 0.0, "int8"),
        ("fedfomo", 0.0, None),
    ],
)
def test_peers_learn_the_trust_weights_the_simulator_learns(
    tmp_path: Path, rule: str, margin: float, codec: str | None
) -> None:
    """One round, two drivers: the same session and seed give the same weights, round by round.

    Peers and the engine run ``mixing.round`` with the same per-node seed streams, so each
    peer's trained state, validation batches, trust fit and held-out check match the node of
    the same index in the simulator (up to float rounding of batched against single products);
    with ``int8`` compression also the public copies both make (``Stream.COMPRESS``). FedFomo
    scores the same batches against the state each node trained from.
    """
    from fedtorrent.config import SimConfig
    from fedtorrent.sim.engine import Engine, make_backend, node_data
    from fedtorrent.sim.scenario import Outgoing
    from fedtorrent.sim.topology import Topology

    torrent = make_torrent(
        tmp_path, rule=rule, nodes=3, cohort=2, trust_margin=margin, compression=codec
    )
    swarm = Swarm(torrent, tmp_path)
    peers = [swarm.peer(i, nodes=3) for i in range(3)]
    assert swarm.run(peers) == ["done"] * 3
    session, data = peers[0].session, [p.data for p in peers]
    # The engine's data: every node's train then validation rows in one array.
    xs, ys, splits, start = [], [], [], 0
    for part in data:
        train, val = len(part.y_train), len(part.y_val)
        xs += [part.x_train.numpy(), part.x_val.numpy()]
        ys += [part.y_train.numpy(), part.y_val.numpy()]
        middle = start + train
        splits.append((np.arange(start, middle), np.arange(middle, middle + val)))
        start += train + val
    nodes = node_data(
        x_train=np.concatenate(xs), y_train=np.concatenate(ys),
        x_test=data[0].x_test.numpy(), y_test=data[0].y_test.numpy(),
        splits=splits, num_classes=10,
    )  # fmt: skip
    net = build_model("logreg", input_shape=(1, 8, 8), num_classes=10)
    engine = Engine(
        backend=make_backend(net, input_shape=(1, 8, 8)),
        data=nodes,
        train=session.train,
        mixing=session.mixing,
        topology=Topology(TopologyConfig(kind="complete"), num_nodes=3, seed=0),
        init=flatten(peers[0].initial),
        seed=session.train.seed,
    )
    if codec is not None:
        run = SimConfig(data=DataConfig(num_nodes=3), seed=session.train.seed, compression=codec)
        engine.share = Outgoing(run, initial=flatten(peers[0].initial))
    records = [read_records(p.out_dir / "metrics.jsonl") for p in peers]
    departed = 0.0
    for r in range(session.rounds):
        weights = engine.run_round(r)
        assert weights is not None
        for i in range(3):
            got = records[i][r]["trust_weights"]
            assert len(got) == 3, got  # everyone heard everyone
            row = {f"peer-{j}": float(weights[i, j]) for j in range(3) if j != i}
            assert got == pytest.approx({"self": float(weights[i, i]), **row}, abs=2e-5)
            departed = max(departed, float((weights[i] - 1 / 3).abs().max()))
        for i in range(3):  # and the mixed models agree too
            expected = float(engine.evaluate().loss[i])
            assert records[i][r]["test_loss"] == pytest.approx(expected, rel=1e-4)
    if margin == 0:  # the weights are learned, not uniform, so the comparison can fail
        assert departed > 1e-3
    else:  # iid nodes: the held-out check keeps uniform weights on both sides
        assert peers[0].trust is not None and peers[0].trust.last_check is False
        assert int(engine.trust_kept.sum()) == 0


def test_compressed_peers_move_a_fraction_of_the_bytes_and_learn_alike(tmp_path: Path) -> None:
    """int8 public copies: a quarter of the payload per state, nearly the same models."""
    results = {}
    for codec in (None, "int8"):
        folder = tmp_path / str(codec)
        folder.mkdir()
        swarm = Swarm(make_torrent(folder, nodes=3, cohort=2, rounds=4, compression=codec), folder)
        peers = [swarm.peer(i, nodes=3) for i in range(3)]
        assert swarm.run(peers) == ["done"] * 3
        records = [read_records(p.out_dir / "metrics.jsonl") for p in peers]
        assert all(r["heard"] == 2 for rs in records for r in rs)
        payload = sum(r["payload_bytes_received"] for rs in records for r in rs)
        loss = float(np.mean([rs[-1]["test_loss"] for rs in records]))
        results[codec] = payload, loss
    (plain, plain_loss), (small, small_loss) = results[None], results["int8"]
    assert small < 0.35 * plain  # 650 values: the container's own header counts a little
    assert small_loss == pytest.approx(plain_loss, rel=0.05)


def test_a_compressed_peers_public_copy_survives_resume(tmp_path: Path) -> None:
    from fedtorrent.node.checkpoint import load_checkpoint

    swarm = Swarm(make_torrent(tmp_path, nodes=2, cohort=1, rounds=2, compression="int8"), tmp_path)
    peers = [swarm.peer(i, nodes=2) for i in range(2)]
    assert swarm.run(peers) == ["done"] * 2
    assert peers[0].sender is not None
    hat = peers[0].sender.hat.clone()
    assert not torch.equal(hat, flatten(peers[0].current))  # a residual is left to send
    saved = load_checkpoint(
        peers[0].out_dir, info_hash=peers[0].info_hash, like=peers[0].like,
        public_like={"hat": torch.zeros_like(hat)},
    )  # fmt: skip
    assert torch.equal(saved.public["hat"], hat)
    again = Swarm(swarm.torrent, tmp_path)
    resumed = again.peer(0, nodes=2, resume=True, rounds=3)
    resumed.start()
    try:
        assert resumed.sender is not None and torch.equal(resumed.sender.hat, hat)
        assert resumed.sender.min_base == 4  # nothing from before the restart is extended
    finally:
        resumed.close()


# -- hostile and silent neighbours ----------------------------------------------------------------


def bad_replies(
    session: Session, info_hash: str, senders: Sequence[str] = ("evil",) * 5
) -> list[Callable[[list[bytes]], list[bytes]]]:
    """Responders that answer with NaN, wrong shapes, another session, garbage, a huge size.

    ``senders`` names the sender of each reply, in that order.
    """

    def state_reply(state: State, sender: str, *, session_hash: str = info_hash) -> list[bytes]:
        return wire.encode_message(
            encode_state(state), info_hash=session_hash, sender=sender, round=99, num_examples=1
        )

    good = {"1.bias": torch.zeros(10), "1.weight": torch.zeros(10, 64)}
    nan = {**good, "1.weight": torch.full((10, 64), float("nan"))}
    wrong_shape = {**good, "1.weight": torch.zeros(10, 65)}
    huge = wire.Header(
        kind="state",
        info_hash=info_hash,
        sender=senders[4],
        round=99,
        num_examples=1,
        payload_len=1 << 40,
        payload_sha256="0" * 64,
    )
    replies = [
        state_reply(nan, senders[0]),
        state_reply(wrong_shape, senders[1]),
        state_reply(good, senders[2], session_hash="cd" * 32),
        [b"\xc1 not msgpack at all"],
        [wire.encode_header(huge), b"x"],
    ]
    return [lambda request, frames=frames: frames for frames in replies]


def test_hostile_peers_are_rejected_counted_backed_off_and_the_peer_keeps_going(
    tmp_path: Path,
) -> None:
    swarm = Swarm(make_torrent(tmp_path, rounds=5, cohort=6, nodes=3), tmp_path)
    honest = [swarm.peer(i) for i in range(2)]
    # Five hostile peers announce themselves like any other; each answers every request badly.
    loaded = load_torrent(swarm.torrent)
    evil = [f"evil-{i}" for i in range(5)]
    for i, respond in enumerate(bad_replies(loaded.session, loaded.info_hash, evil)):
        swarm.network.add_raw_peer(f"mem://{1000 + 10 * i}", respond)
        key = PeerIdentity.generate().public_key_hex  # a key: it is dialled, then rejected
        swarm.tracker.announce(
            loaded.info_hash, evil[i], port=1001 + 10 * i, event="started", pubkey=key
        )
    assert swarm.run(honest) == ["done", "done"]
    expected = {"non_finite", "bad_shape", "wrong_session", "bad_header", "oversized"}
    for peer in honest:
        records = read_records(peer.out_dir / "metrics.jsonl")
        assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
        assert set(records[0]["rejected_from"]) == set(evil)
        for record in records:
            assert record["heard"] == 1  # the honest neighbour, every round
            assert not set(evil) & set(record["heard_from"])
        for record in records[1:]:  # a rejection backs off for 4 rounds: never dialled again
            assert record["rejected_from"] == {}
            assert {p: record["skipped"][p] for p in evil} == dict.fromkeys(evil, "backed_off")
            assert record["neighbours"]["skipped"] == {"backed_off": 5}
        status = json.loads((peer.out_dir / "status.json").read_text())
        summary = json.loads((peer.out_dir / "summary.json").read_text())
        assert status["state"] == "done"
        assert status["rejected"] == 5
        assert summary["rejections"] == status["rejections"]
        assert set(summary["rejections_per_peer"]) == set(evil)
        assert set(status["rejections"]) == expected
        assert summary["neighbours"]["candidates_skipped"] == {"backed_off": 4 * 5}
        assert summary["neighbours"]["heard_distinct"] == 1


def test_hostile_compressed_updates_are_rejected_counted_and_the_peer_keeps_going(
    tmp_path: Path,
) -> None:
    """Signed by their senders' announced keys, so only the compressed decoders can refuse them."""
    from fedtorrent.net.identity import new_nonce, sign_update
    from fedtorrent.node.compressed import encode_updates
    from fedtorrent.state.compress import HEADER, Compression, compress, encode_packet

    swarm = Swarm(make_torrent(tmp_path, rounds=3, cohort=6, nodes=3, compression="int8"), tmp_path)
    loaded = load_torrent(swarm.torrent)
    spec = Compression.parse("int8")
    packet = encode_packet(compress(torch.ones(650), spec, generator=torch.Generator()))
    nan_scale = packet[: HEADER.size] + struct.pack("<f", float("nan")) + packet[HEADER.size + 4 :]
    fields = list(HEADER.unpack_from(packet))
    fields[4] = 2**31  # declares two billion values
    huge = HEADER.pack(*fields) + packet[HEADER.size :]
    bodies = {
        "nan-scale": (encode_updates([nan_scale], {}), "int8"),
        "truncated": (encode_updates([packet[:-5]], {}), "int8"),
        "huge-count": (encode_updates([huge], {}), "int8"),
        "other-codec": (encode_updates([packet], {}), "topk:0.1,int8"),
        "bad-container": (encode_state({"__packets__": torch.zeros(3, dtype=torch.uint8)}), "int8"),
    }
    evil = list(bodies)
    for i, (sender, (payload, codec)) in enumerate(bodies.items()):
        identity = PeerIdentity.generate()
        digest, nonce = hashlib.sha256(payload).hexdigest(), new_nonce()
        sig = sign_update(identity, info_hash=loaded.info_hash, round=1, sender=sender,
                          receiver=None, payload_sha256=digest, nonce=nonce)  # fmt: skip
        frames = wire.encode_message(
            payload, info_hash=loaded.info_hash, sender=sender, round=1, num_examples=1,
            sig=sig, nonce=nonce, pubkey=identity.public_key, payload_sha256=digest,
            codec=codec, base=0,
        )  # fmt: skip
        swarm.network.add_raw_peer(f"mem://{2000 + 10 * i}", lambda request, f=frames: f)
        swarm.tracker.announce(
            loaded.info_hash, sender, port=2001 + 10 * i, event="started",
            pubkey=identity.public_key_hex,
        )  # fmt: skip
    honest = [swarm.peer(i) for i in range(2)]
    assert swarm.run(honest) == ["done", "done"]
    for peer in honest:
        records = read_records(peer.out_dir / "metrics.jsonl")
        assert [r["round"] for r in records] == [1, 2, 3]
        assert all(r["heard"] == 1 for r in records)  # the honest neighbour, every round
        assert set(records[0]["rejected_from"]) == set(evil)
        reasons = set(records[0]["rejected_from"].values())
        assert (
            reasons <= {"bad_compressed", "oversized", "non_finite"} and "bad_compressed" in reasons
        )
        status = json.loads((peer.out_dir / "status.json").read_text())
        assert status["state"] == "done" and status["rejected"] == len(evil)


def test_a_receive_hook_can_reject_a_valid_state(swarm: Swarm) -> None:
    def refuse_peer_1(reply: Reply) -> None:
        if reply.peer_id == "peer-1":
            raise MessageError("unsigned", reason="bad_header")

    peers = [swarm.peer(0, receive_hook=refuse_peer_1), swarm.peer(1), swarm.peer(2)]
    swarm.run(peers)
    first, *later = read_records(peers[0].out_dir / "metrics.jsonl")
    assert first["heard_from"] == ["peer-2"]
    assert first["rejected_from"] == {"peer-1": "bad_header"}
    for record in later:  # rejected: backed off for the next rounds
        assert record["heard_from"] == ["peer-2"]
        assert record["skipped"] == {"peer-1": "backed_off"}


def test_a_silent_peer_costs_at_most_the_deadline_then_is_backed_off(tmp_path: Path) -> None:
    swarm = Swarm(make_torrent(tmp_path, rounds=2, cohort=2, nodes=3), tmp_path)
    swarm.tracker.announce("0" * 64, "x", port=1)  # an unrelated swarm is ignored
    loaded = load_torrent(swarm.torrent)
    swarm.network.silence("mem://2000")
    ghost_key = PeerIdentity.generate().public_key_hex
    swarm.tracker.announce(loaded.info_hash, "ghost", port=2001, event="started", pubkey=ghost_key)
    peers = [swarm.peer(i, exchange_timeout=1.0) for i in range(2)]
    started = time.monotonic()
    assert swarm.run(peers) == ["done", "done"]
    elapsed = time.monotonic() - started
    for peer in peers:
        first, second = read_records(peer.out_dir / "metrics.jsonl")
        assert first["missing"] == {"ghost": "timeout"}
        assert 0.9 <= first["timings"]["exchange"] <= 1.0 + 0.5
        # Then it is backed off: not dialled, so it costs the next round nothing.
        assert second["missing"] == {}
        assert second["skipped"] == {"ghost": "backed_off"}
        assert second["timings"]["exchange"] < 0.9
        assert first["heard"] == second["heard"] == 1
    assert elapsed < 2 * 1.0 + 10  # two rounds, each at most one deadline (plus training)


def test_a_neighbour_behind_is_waited_for_and_a_stale_state_is_used_at_the_deadline(
    tmp_path: Path,
) -> None:
    swarm = Swarm(make_torrent(tmp_path, rounds=2, cohort=1, nodes=2), tmp_path)
    loaded = load_torrent(swarm.torrent)
    like = {"1.bias": torch.zeros(10), "1.weight": torch.zeros(10, 64)}
    slow, payload, nonce = PeerIdentity.generate(), encode_state(like), new_nonce()
    signed = {"info_hash": loaded.info_hash, "round": 0, "sender": "slow"}
    sig = sign_update(
        slow, receiver=None, payload_sha256=state_digest(payload), nonce=nonce, **signed
    )
    behind = wire.encode_message(payload, num_examples=5, sig=sig, nonce=nonce, **signed)
    asked: list[float] = []

    def respond(request: list[bytes]) -> list[bytes]:
        asked.append(time.monotonic())
        return list(behind)

    swarm.network.add_raw_peer("mem://3000", respond)
    swarm.tracker.announce(
        loaded.info_hash, "slow", port=3001, event="started", pubkey=slow.public_key_hex
    )
    peer = swarm.peer(0, nodes=2, exchange_timeout=0.6)
    swarm.run([peer])
    records = read_records(peer.out_dir / "metrics.jsonl")
    assert [r["staleness"] for r in records] == [{"slow": 1}, {"slow": 2}]
    assert len(asked) >= 4  # re-asked (with backoff) while it stayed behind
    assert all(r["heard_from"] == ["slow"] for r in records)


# -- checkpoint and resume ------------------------------------------------------------------------


def test_checkpoint_round_trip_and_refusals(tmp_path: Path) -> None:
    like = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    state = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    saved = Checkpoint(
        info_hash="ab" * 32,
        peer_id="p",
        round=7,
        state=state,
        trust={"self": 0.5, "peers": {"q": -0.25}},
        metrics={"test_accuracy": 0.9, "train_loss": float("nan")},
        seeds={"seed": 3},
        totals={"bytes_sent": 10},
    )
    save_checkpoint(tmp_path, saved)
    loaded = load_checkpoint(tmp_path, info_hash="ab" * 32, like=like)
    assert loaded.round == 7 and loaded.peer_id == "p"
    assert loaded.trust == saved.trust and loaded.seeds == {"seed": 3}
    assert loaded.metrics["train_loss"] is None  # NaN is stored as null
    assert all(torch.equal(loaded.state[k], state[k]) for k in state)
    record = json.loads((tmp_path / "checkpoint.json").read_text())
    assert record["round"] == 7 and record["trust"] == saved.trust
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    with pytest.raises(StateError, match="session"):
        load_checkpoint(tmp_path, info_hash="cd" * 32, like=like)
    with pytest.raises(StateError, match="shape"):
        load_checkpoint(tmp_path, info_hash="ab" * 32, like={**like, "b": torch.zeros(5)})
    (tmp_path / "checkpoint.safetensors").write_bytes(encode_state(state))  # no record
    with pytest.raises(StateError, match="no fedtorrent checkpoint"):
        load_checkpoint(tmp_path, info_hash="ab" * 32, like=like)
    (tmp_path / "checkpoint.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(StateError):
        load_checkpoint(tmp_path, info_hash="ab" * 32, like=like)


def test_resume_continues_from_the_last_checkpoint(tmp_path: Path) -> None:
    torrent = make_torrent(tmp_path, rule="learned", rounds=4, nodes=2, cohort=1)
    first = Swarm(torrent, tmp_path)
    peers = [first.peer(i, nodes=2, rounds=2) for i in range(2)]
    assert first.run(peers) == ["done", "done"]
    saved_trust = peers[0].trust.state_dict() if peers[0].trust else None
    checkpoint = json.loads((peers[0].out_dir / "checkpoint.json").read_text())
    assert checkpoint["round"] == 2 and checkpoint["trust"] == saved_trust

    # A record written after the checkpoint (a crash between the two) is dropped and redone.
    with (peers[0].out_dir / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"round": 3, "peer_id": "peer-0"}) + "\n")
    second = Swarm(torrent, tmp_path)
    again = [second.peer(i, nodes=2, resume=True) for i in range(2)]
    again[0].start()
    assert again[0].round_done == 2
    assert again[0].trust is not None and again[0].trust.state_dict() == saved_trust
    assert torch.equal(flatten(again[0].current), flatten(peers[0].current))
    again[0].close()
    third = Swarm(torrent, tmp_path)
    resumed = [third.peer(i, nodes=2, resume=True) for i in range(2)]
    assert third.run(resumed) == ["done", "done"]
    rounds = [r["round"] for r in read_records(resumed[0].out_dir / "metrics.jsonl")]
    assert rounds == [1, 2, 3, 4]
    assert json.loads((resumed[0].out_dir / "checkpoint.json").read_text())["round"] == 4


# -- refusals at start ----------------------------------------------------------------------------


def test_an_initial_state_that_differs_from_the_torrent_is_refused(swarm: Swarm) -> None:
    path = state_path_for(swarm.torrent)
    payload = bytearray(path.read_bytes())
    payload[-1] ^= 1
    path.write_bytes(bytes(payload))
    with pytest.raises(TorrentError, match="sha256"):
        swarm.peer(0).start()


def test_peer_config_is_validated(tmp_path: Path) -> None:
    base = {"torrent": tmp_path / "t", "out_dir": tmp_path}
    with pytest.raises(ConfigError, match="either"):
        PeerConfig(**base, node_index=0, num_nodes=2, examples=tmp_path)
    with pytest.raises(ConfigError, match="node index"):
        PeerConfig(**base, node_index=2, num_nodes=2)
    with pytest.raises(ConfigError, match="peer id"):
        PeerConfig(**base, node_index=0, num_nodes=2, peer_id="has space")
    with pytest.raises(ConfigError, match="exchange_timeout"):
        PeerConfig(**base, node_index=0, num_nodes=2, exchange_timeout=float("nan"))
    with pytest.raises(ConfigError, match="advertise"):
        PeerConfig(**base, node_index=0, num_nodes=2, advertise_ip="not-an-ip")


def test_a_built_in_peer_without_a_shard_or_examples_fails_at_start(tmp_path: Path) -> None:
    # PeerConfig cannot tell (a task peer may own its data); the built-in session can.
    peer = Peer(PeerConfig(torrent=make_torrent(tmp_path), out_dir=tmp_path / "p"))
    with pytest.raises(ConfigError, match="node index with a number of nodes, or examples"):
        peer.start()
    peer.close()
    assert peer.state == "failed"


def test_a_peer_whose_start_fails_says_so_in_its_status_and_writes_no_summary(
    tmp_path: Path,
) -> None:
    from fedtorrent.node.report import summary

    out = tmp_path / "out"
    peer = Peer(PeerConfig(torrent=tmp_path / "missing.torrent", out_dir=out, node_index=0,
                           num_nodes=2))  # fmt: skip
    assert peer.snapshot().out_dir is None  # before start: nothing to write to
    with pytest.raises(TorrentError):
        peer.start()
    snapshot = peer.snapshot()
    assert snapshot.traffic is None and snapshot.session is None and snapshot.rounds is None
    with pytest.raises(ValueError, match="transport"):
        summary(snapshot, test=None)
    peer.close()
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["error"].startswith("TorrentError")
    assert (status["rounds"], status["address"], status["tracker"]) == (None, None, "unknown")
    assert (status["bytes_sent"], status["rejections"]) == (0, {})
    assert not (out / "summary.json").exists()


def test_peer_data_needs_a_shard_or_examples(tmp_path: Path) -> None:
    from fedtorrent.node.data import load_peer_data

    session = load_torrent(make_torrent(tmp_path)).session
    with pytest.raises(ConfigError, match="node index"):
        load_peer_data(session, node_index=0)
    data = load_peer_data(session, node_index=1, num_nodes=3)
    assert len(data.y_train) > 0 and data.num_classes == 10


def test_own_examples_are_read_and_checked(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(x, rng.integers(0, 256, size=(5, 1, 8, 8), dtype=np.uint8))
    np.save(y, np.array([0, 1, 2, 3, 9]))
    images, labels = read_examples(x, y, num_classes=10)
    assert images.dtype == np.float32 and float(images.max()) <= 1.0 and labels.dtype == np.int64
    np.save(y, np.array([0, 1, 2, 3, 10]))
    with pytest.raises(DataError, match="labels"):
        read_examples(x, y, num_classes=10)
    np.save(y, np.array([0, 1, 2, 3]))
    with pytest.raises(DataError, match="integer labels"):
        read_examples(x, y, num_classes=10)
    np.save(x, np.zeros((4, 64), dtype=np.float32))
    with pytest.raises(DataError, match="N, C, H, W"):
        read_examples(x, y, num_classes=10)
    np.save(x, np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
    with pytest.raises(DataError):  # never unpickled
        read_examples(x, y, num_classes=10)
    np.save(x, np.full((4, 1, 8, 8), np.nan, dtype=np.float32))
    with pytest.raises(DataError, match="NaN"):
        read_examples(x, y, num_classes=10)


def test_a_peer_runs_on_its_own_examples_folder(swarm: Swarm, tmp_path: Path) -> None:
    from fedtorrent.data import load_dataset

    digits = load_dataset("digits")
    folder = tmp_path / "own"
    folder.mkdir()
    np.save(folder / "x.npy", digits.x_train[:150])
    np.save(folder / "y.npy", digits.y_train[:150])
    np.save(folder / "x_test.npy", digits.x_test[:50])
    np.save(folder / "y_test.npy", digits.y_test[:50])
    config = PeerConfig(
        torrent=swarm.torrent, out_dir=tmp_path / "own-out", examples=folder, rounds=1,
        exchange_timeout=0.2, linger=0,
    )  # fmt: skip
    peer = Peer(
        config,
        transport=lambda cfg: MemoryTransport(swarm.network, cfg),
        tracker=swarm.tracker,
        addressing=MemAddressing(),
    )
    peer.start()
    assert peer.run() == "done"
    peer.close()
    assert len(peer.data.y_train) + len(peer.data.y_val) == 150
    summary = json.loads((tmp_path / "own-out" / "summary.json").read_text())
    assert summary["test"]["num_examples"] == 50
    assert summary["train_examples"] == len(peer.data.y_train)


def test_tracker_down_keeps_training_on_the_cached_cohort(tmp_path: Path) -> None:
    swarm = Swarm(make_torrent(tmp_path, rounds=5, nodes=2, cohort=1), tmp_path)

    def outage(state: State, round: int) -> State:  # peer-0 takes the tracker down and up
        swarm.tracker.down = round in (2, 3)
        return state

    peers = [swarm.peer(0, nodes=2, send_hook=outage), swarm.peer(1, nodes=2)]
    assert swarm.run(peers) == ["done", "done"]
    first = read_records(peers[0].out_dir / "metrics.jsonl")
    assert [r["tracker"] for r in first] == ["ok", "cached", "cached", "ok", "ok"]
    for peer in peers:
        records = read_records(peer.out_dir / "metrics.jsonl")
        assert [r["heard"] for r in records] == [1] * 5  # the cached cohort still answers
        assert records[-1]["tracker"] == "ok"
    # Back online, peer-0 announced itself again as started.
    calls = [c for c in swarm.tracker.calls if c["peer_id"] == "peer-0" and c["answered"]]
    assert [c["event"] for c in calls].count("started") == 2
    summary = json.loads((peers[0].out_dir / "summary.json").read_text())
    assert summary["tracker"]["announces"]["reconnected"] == 1


def test_no_tracker_at_all_still_trains_alone(tmp_path: Path) -> None:
    swarm = Swarm(make_torrent(tmp_path, rounds=2, nodes=2, cohort=1), tmp_path)
    swarm.tracker.down = True
    peer = swarm.peer(0, nodes=2, exchange_timeout=0.3)
    assert swarm.run([peer]) == ["done"]
    records = read_records(peer.out_dir / "metrics.jsonl")
    assert [(r["tracker"], r["heard"]) for r in records] == [("down", 0), ("down", 0)]


def test_transport_factory_gets_the_session_and_a_payload_limit(swarm: Swarm) -> None:
    seen: list[TransportConfig] = []

    def factory(cfg: TransportConfig) -> MemoryTransport:
        seen.append(cfg)
        return MemoryTransport(swarm.network, cfg)

    peer = Peer(
        replace(swarm.peer(0).config),
        transport=factory,
        tracker=swarm.tracker,
        addressing=MemAddressing(),
    )
    peer.start()
    peer.close()
    assert seen[0].peer_id == "peer-0"
    assert seen[0].info_hash == peer.info_hash
    assert seen[0].max_payload_bytes == 2 * peer.session.state_size + (64 << 10)


# -- churn: late joiners and leavers --------------------------------------------------------------


class Gate:
    """A send hook that records what each peer shares and holds it before publishing ``at``."""

    def __init__(self, recorder: Recorder, *, at: int) -> None:
        self.recorder, self.at = recorder, at
        self.opened = threading.Event()
        self.arrived: set[str] = set()
        self.lock = threading.Condition()

    def hook(self, name: str) -> Callable[[State, int], State]:
        record = self.recorder.hook(name)

        def send(state: State, round: int) -> State:
            state = record(state, round)
            if round == self.at:
                with self.lock:
                    self.arrived.add(name)
                    self.lock.notify_all()
                assert self.opened.wait(30), "the gate never opened"
            return state

        return send

    def wait_for(self, names: set[str]) -> None:
        with self.lock:
            assert self.lock.wait_for(lambda: names <= self.arrived, timeout=30), self.arrived


def run_in_threads(peers: Sequence[Peer]) -> tuple[list[threading.Thread], dict[str, str]]:
    outcomes: dict[str, str] = {}
    threads = [
        threading.Thread(target=lambda p=p: outcomes.__setitem__(p.peer_id, p.run())) for p in peers
    ]
    for thread in threads:
        thread.start()
    return threads, outcomes


def test_a_late_joiner_starts_from_the_mean_of_its_neighbours_verified_states(
    tmp_path: Path,
) -> None:
    swarm = Swarm(make_torrent(tmp_path, nodes=4, cohort=2, rounds=6), tmp_path)
    gate = Gate(Recorder(), at=4)  # the early peers wait after round 3 until the joiner is in
    early = [swarm.peer(i, nodes=4, send_hook=gate.hook(f"peer-{i}")) for i in range(3)]
    for peer in early:
        peer.start()
    threads, outcomes = run_in_threads(early)
    try:
        gate.wait_for({"peer-0", "peer-1", "peer-2"})
        joiner = swarm.peer(3, nodes=4, join=True)
        joiner.start()
        assert joiner.round_done == 3
        joined = json.loads((joiner.out_dir / "joined.json").read_text())
        assert joined["round"] == 3
        assert joined["sources"] == {"peer-0": 3, "peer-1": 3, "peer-2": 3}
        shared = [flatten(gate.recorder.shared[(f"peer-{i}", 3)]) for i in range(3)]
        assert torch.allclose(flatten(joiner.current), torch.stack(shared).mean(0), atol=1e-6)
        joiner_thread, joiner_outcome = run_in_threads([joiner])
    finally:
        gate.opened.set()
    for thread in [*threads, *joiner_thread]:
        thread.join(50)
    assert set(outcomes.values()) == {"done"} and joiner_outcome == {"peer-3": "done"}
    assert joiner.ledger is not None  # it names the three states the joiner started from
    entries = joiner.ledger.entries()
    received = [e for e in entries if e.direction == "received" and e.round == 3]
    assert sorted(e.sender for e in received) == ["peer-0", "peer-1", "peer-2"]
    assert [e.weight for e in received] == pytest.approx([1 / 3] * 3)
    for peer in [*early, joiner]:
        peer.close()
    records = read_records(joiner.out_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == [4, 5, 6]  # from the round after the one joined
    assert records[0]["heard"] >= 1
    others = [read_records(p.out_dir / "metrics.jsonl")[-1]["test_accuracy"] for p in early]
    assert abs(records[-1]["test_accuracy"] - sum(others) / 3) < 0.1
    summary = json.loads((joiner.out_dir / "summary.json").read_text())
    assert summary["rounds_done"] == 6


def test_a_late_joiner_screens_out_an_implausible_source(tmp_path: Path) -> None:
    swarm = Swarm(make_torrent(tmp_path, nodes=4, cohort=2, rounds=4), tmp_path)
    gate = Gate(Recorder(), at=3)
    early = [
        swarm.peer(0, nodes=4, send_hook=gate.hook("peer-0")),
        swarm.peer(1, nodes=4, send_hook=gate.hook("peer-1")),
        swarm.peer(2, nodes=4, send_hook=gate.hook("peer-2"), attack="scale", attack_scale=100.0),
    ]
    for peer in early:
        peer.start()
    threads, _ = run_in_threads(early)
    try:
        gate.wait_for({"peer-0", "peer-1", "peer-2"})
        joiner = swarm.peer(3, nodes=4, join=True)
        joiner.start()
    finally:
        gate.opened.set()
    for thread in threads:
        thread.join(50)
    joined = json.loads((joiner.out_dir / "joined.json").read_text())
    assert joined["implausible"] == ["peer-2"]
    assert joined["sources"] == {"peer-0": 2, "peer-1": 2}
    assert joiner.transport.stats.rejections()["implausible"] == 1
    honest = [flatten(gate.recorder.shared[(f"peer-{i}", 2)]) for i in range(2)]
    assert torch.allclose(flatten(joiner.current), torch.stack(honest).mean(0), atol=1e-6)
    for peer in [*early, joiner]:
        peer.close()


def test_a_late_joiner_of_a_compressed_session_serves_whole_copies_first(tmp_path: Path) -> None:
    swarm = Swarm(make_torrent(tmp_path, nodes=3, cohort=2, rounds=5, compression="int8"), tmp_path)
    gate = Gate(Recorder(), at=3)
    early = [swarm.peer(i, send_hook=gate.hook(f"peer-{i}")) for i in range(2)]
    for peer in early:
        peer.start()
    threads, outcomes = run_in_threads(early)
    try:
        gate.wait_for({"peer-0", "peer-1"})
        joiner = swarm.peer(2, join=True)
        joiner.start()
        assert joiner.round_done == 2 and joiner.sender is not None
        assert joiner.sender.min_base == 4  # nobody holds a copy of its own yet
        joiner_threads, joiner_outcome = run_in_threads([joiner])
    finally:
        gate.opened.set()
    for thread in [*threads, *joiner_threads]:
        thread.join(50)
    assert set(outcomes.values()) == {"done"} and joiner_outcome == {"peer-2": "done"}
    for peer in [*early, joiner]:
        peer.close()
    records = read_records(joiner.out_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == [3, 4, 5]
    assert not records[-1]["rejected"]
    for peer in early:  # the joiner's states were taken, none refused
        last = read_records(peer.out_dir / "metrics.jsonl")[-1]
        assert "peer-2" in last["heard_from"] and not last["rejected"]


def test_neighbours_stop_waiting_for_a_peer_that_leaves(tmp_path: Path) -> None:
    swarm = Swarm(make_torrent(tmp_path, nodes=2, cohort=1, rounds=4), tmp_path)
    gate = Gate(Recorder(), at=3)  # peer-1 stalls before publishing round 3...
    peers = [swarm.peer(0, nodes=2, exchange_timeout=20.0)]
    peers.append(swarm.peer(1, nodes=2, exchange_timeout=20.0, send_hook=gate.hook("peer-1")))
    for peer in peers:
        peer.start()
    threads, outcomes = run_in_threads(peers)
    try:
        gate.wait_for({"peer-1"})
        peers[1].request_stop()  # ...and leaves: peer-0 must not wait out its 20 s deadline
        deadline = time.monotonic() + 8
        while peers[0].round_done < 4 and time.monotonic() < deadline:
            time.sleep(0.02)  # a poll interval
    finally:
        gate.opened.set()
    for thread in threads:
        thread.join(50)
    assert outcomes == {"peer-0": "done", "peer-1": "stopped"}
    records = read_records(peers[0].out_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    # Round 3 took peer-1's round-2 state at once (when peer-0 had polled it before it left),
    # or went without it; round 4 found it gone (or no longer listed).
    assert records[2]["staleness"] == {"peer-1": 1} or records[2]["missing"] == {
        "peer-1": "refused:gone"
    }
    assert records[3]["missing"] in ({}, {"peer-1": "refused:gone"}, {"peer-1": "unreachable"})
    assert all(r["duration_s"] < 6 for r in records[2:])
    for peer in peers:
        peer.close()


# -- deadlines, stragglers and the asynchronous mode ----------------------------------------------


def test_a_neighbour_that_dies_costs_one_short_deadline_then_is_skipped(tmp_path: Path) -> None:
    """After a few rounds the deadline follows the lags (far below the cap); a neighbour silenced
    mid-run costs its neighbours that short deadline once, then it is backed off."""
    swarm = Swarm(make_torrent(tmp_path, rounds=6, cohort=2, nodes=3), tmp_path)
    cap = 8.0

    in_round_4 = threading.Barrier(3, timeout=30)  # every peer is past round 3 when it dies

    def meet(state: State, round: int) -> State:
        if round == 4:
            in_round_4.wait()
        return state

    def die_at_round_4(state: State, round: int) -> State:
        if round == 4:
            in_round_4.wait()
            swarm.network.silence(swarm.peers[2].address)  # before it publishes round 4
        return state

    peers = [swarm.peer(i, exchange_timeout=cap, send_hook=meet) for i in range(2)]
    peers.append(swarm.peer(2, exchange_timeout=cap, send_hook=die_at_round_4))
    assert swarm.run(peers) == ["done"] * 3
    for peer in peers[:2]:
        records = read_records(peer.out_dir / "metrics.jsonl")
        assert records[0]["deadline_s"] == records[1]["deadline_s"] == cap  # nothing measured yet
        died = records[3]
        assert died["missing"] == {"peer-2": "timeout"}
        assert died["deadline_s"] <= cap / 2  # adapted: a short deadline, not the cap
        assert died["timings"]["exchange"] <= died["deadline_s"] + 1.0
        assert records[4]["skipped"].get("peer-2") == "backed_off"  # skipped: no deadline lost
        for record in records[4:]:
            assert record["timings"]["exchange"] <= died["deadline_s"] + 1.0
        assert all(set(r["lags"]) == set(r["heard_from"]) for r in records)


def test_the_asynchronous_mode_does_not_wait_for_a_slow_neighbour(tmp_path: Path) -> None:
    """With --staleness 2 the fast peers go on without the slow one; its states are mixed when
    at most 2 rounds old, and the slow peer mixes the fast peers' newer states."""
    swarm = Swarm(make_torrent(tmp_path, rounds=4, cohort=2, nodes=3), tmp_path)
    peers = [swarm.peer(i, staleness=2, exchange_timeout=5.0) for i in range(2)]
    peers.append(swarm.peer(2, staleness=2, exchange_timeout=5.0, slowdown=60.0))
    assert swarm.run(peers) == ["done"] * 3
    records = [read_records(p.out_dir / "metrics.jsonl") for p in peers]
    slow_rounds = [r["duration_s"] for r in records[2][1:]]
    for fast in records[:2]:
        assert all(r["max_staleness"] == 2 and r["slowdown"] == 1.0 for r in fast)
        durations = [r["duration_s"] for r in fast[1:]]  # the first round waits for the swarm
        assert max(durations) < min(slow_rounds) / 2
        for record in fast:
            assert all(s <= 2 for s in record["staleness"].values())
            assert set(record["missing"].values()) <= {"too_stale", "refused:not_ready"}
    assert records[2][-1]["slowdown"] == 60.0
    assert records[2][-1]["timings"]["slowdown"] > 0
    assert any(s < 0 for r in records[2] for s in r["staleness"].values())  # newer states mixed


def test_staleness_and_slowdown_are_checked(tmp_path: Path) -> None:
    base = {"torrent": tmp_path / "t.torrent", "out_dir": tmp_path, "node_index": 0, "num_nodes": 2}
    with pytest.raises(ConfigError, match="staleness"):
        PeerConfig(**base, staleness=-1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--central"):
        PeerConfig(**base, staleness=2, central=True)  # type: ignore[arg-type]
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="slowdown"):
            PeerConfig(**base, slowdown=bad)  # type: ignore[arg-type]
