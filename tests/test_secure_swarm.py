"""Secure links, signed updates and the ledger in a real swarm on 127.0.0.1.

Peers run in threads of this process, each with its real ``ZmqTransport`` (CurveZMQ on, a ZAP
handler in front of its socket), and find each other through a real HTTP tracker. The ledgers they
write are then verified with the ``fedtorrent ledger verify`` command, and copies of them are
tampered with to show that verification catches an edited entry and an equivocating peer.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq
from typer.testing import CliRunner

from fedtorrent.cli import app
from fedtorrent.config import TrackerConfig
from fedtorrent.errors import NetworkError
from fedtorrent.ledger import Ledger, ledger_path, verify_ledgers
from fedtorrent.metrics.records import read_records
from fedtorrent.net.identity import load_or_create_identity, new_nonce, sign_update
from fedtorrent.net.tracker.server import BackgroundTracker
from fedtorrent.net.transport import Endpoint, PeerRefusedError, TransportConfig, ZmqTransport
from fedtorrent.node.peer import Peer, PeerConfig

pytestmark = [
    pytest.mark.network,
    pytest.mark.timeout(90),
    pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CurveZMQ"),
]


@pytest.fixture
def tracker(tmp_path: Path) -> Iterator[BackgroundTracker]:
    config = TrackerConfig(port=0, db_path=tmp_path / "tracker.db", interval=30, rate_limit=0)
    with BackgroundTracker(config) as running:
        yield running


def make_torrent(
    folder: Path, url: str, *, nodes: int, rounds: int, allow: Sequence[str] = ()
) -> Path:
    from fedtorrent.cli.net import create

    path = folder / "session.torrent"
    create(
        output=path,
        tracker=f"{url}/announce",
        dataset="digits",
        nodes=nodes,
        cohort=2,
        rounds=rounds,
        mixing="fixed",
        batch_size=32,
        allow_key=list(allow),
    )
    return path


def peer_config(torrent: Path, root: Path, index: int, *, nodes: int, **kw: Any) -> PeerConfig:
    return PeerConfig(
        torrent=torrent,
        out_dir=root / "peers" / f"peer-{index:02d}",
        node_index=index % nodes,
        num_nodes=nodes,
        exchange_timeout=kw.pop("exchange_timeout", 5.0),
        linger=kw.pop("linger", 1.0),
        **kw,
    )


def run_peers(
    configs: Sequence[PeerConfig], alongside: Callable[[Sequence[Peer]], None] | None = None
) -> list[Peer]:
    """Start every peer, run them all in threads, close them; fails on any peer's error.

    ``alongside`` runs in this thread while the peers run (before they are joined).
    """
    torch.manual_seed(0)
    peers = [Peer(config) for config in configs]
    errors: list[BaseException] = []

    def go(peer: Peer) -> None:
        try:
            peer.run()
        except BaseException as exc:
            errors.append(exc)

    try:
        for peer in peers:
            peer.start()
        threads = [threading.Thread(target=go, args=(peer,)) for peer in peers]
        for thread in threads:
            thread.start()
        if alongside is not None:
            alongside(peers)
        for thread in threads:
            thread.join(60)
    finally:
        for peer in peers:
            peer.close()
    assert not errors, errors
    return peers


def keys_file(peers: Sequence[Peer], path: Path) -> Path:
    path.write_text(json.dumps({p.peer_id: p.identity.public_key_hex for p in peers}))
    return path


def verify_command(*args: str) -> Any:
    return CliRunner().invoke(app, ["ledger", "verify", *args])


def test_an_honest_curve_swarm_finishes_and_its_ledgers_verify(
    tmp_path: Path, tracker: BackgroundTracker
) -> None:
    torrent = make_torrent(tmp_path, tracker.url, nodes=3, rounds=2)
    peers = run_peers([peer_config(torrent, tmp_path, i, nodes=3) for i in range(3)])
    folders = sorted((tmp_path / "peers").iterdir())
    for peer in peers:
        assert peer.state == "done"
        records = read_records(peer.out_dir / "metrics.jsonl")
        assert [r["round"] for r in records] == [1, 2]
        assert all(r["rejected"] == 0 and r["heard"] >= 1 for r in records)
        assert records[-1]["heard"] == 2
        summary = json.loads((peer.out_dir / "summary.json").read_text())
        security = summary["security"]
        assert {k: security[k] for k in ("public_key", "swarm", "ledger", "epsilon")} == {
            "public_key": peer.identity.public_key_hex,
            "swarm": "open",
            "ledger": ledger_path(peer.out_dir, peer.peer_id).name,
            "epsilon": None,
        }
        with Ledger(
            ledger_path(peer.out_dir, peer.peer_id), peer.identity, owner=peer.peer_id
        ) as ledger:
            entries = ledger.entries()
        received = [e for e in entries if e.direction == "received"]
        assert len(received) == sum(r["heard"] for r in records)
        assert all(e.weight == pytest.approx(1 / 3) and e.update_signature for e in received)
        sent = [(e.round, e.receiver) for e in entries if e.direction == "sent"]
        assert sent  # one row per state and requester: at most rounds x the 2 others
        assert len(set(sent)) == len(sent) <= 2 * len(records)
        # The key file is private; the public halves sit beside it.
        key_file = peer.out_dir / "keys" / "ed25519.key"
        assert key_file.stat().st_mode & 0o777 == 0o600

    keys = keys_file(peers, tmp_path / "keys.json")
    result = verify_command(*map(str, folders), "--keys", str(keys))
    assert result.exit_code == 0, result.output
    assert "OK: 3 ledgers, 0 problems" in result.output

    # An edited entry: the mixing weight peer 1 recorded, changed afterwards.
    edited = tmp_path / "edited"
    shutil.copytree(tmp_path / "peers", edited)
    db = sqlite3.connect(ledger_path(edited / "peer-01", "peer-1"))
    with db:
        changed = db.execute(
            "UPDATE entries SET weight = 0.9 WHERE direction = 'received' AND seq = "
            "(SELECT min(seq) FROM entries WHERE direction = 'received')"
        ).rowcount
    db.close()
    assert changed == 1
    report = verify_ledgers([edited], {p.peer_id: p.identity.public_key_hex for p in peers})
    assert [(f.kind, f.owner) for f in report.problems] == [("tampered", "peer-1")]
    assert verify_command(str(edited)).exit_code == 1

    # An equivocating peer: peer 0 signs and logs a second state for round 1, consistently.
    forked = tmp_path / "forked"
    shutil.copytree(tmp_path / "peers", forked)
    identity = load_or_create_identity(forked / "peer-00" / "keys")
    other, nonce = "ee" * 32, new_nonce()
    info_hash = peers[0].info_hash
    signature = sign_update(
        identity,
        info_hash=info_hash,
        round=1,
        sender="peer-0",
        receiver=None,
        payload_sha256=other,
        nonce=nonce,
    )
    path = ledger_path(forked / "peer-00", "peer-0")
    with Ledger(path, identity, owner="peer-0", info_hash=info_hash) as ledger:
        ledger.record_sent(
            round=1,
            receiver="peer-2",
            payload_sha256=other,
            num_bytes=100,
            nonce=nonce,
            update_signature=signature,
        )
    report = verify_ledgers([forked])
    assert [(f.kind, f.owner, f.round) for f in report.problems] == [("equivocation", "peer-0", 1)]
    result = verify_command(str(forked))
    assert result.exit_code == 1 and "equivocation" in result.output


def test_a_key_outside_a_closed_swarm_is_refused_at_the_handshake(
    tmp_path: Path, tracker: BackgroundTracker
) -> None:
    members = [load_or_create_identity(tmp_path / "keys" / f"member-{i}") for i in range(2)]
    torrent = make_torrent(
        tmp_path, tracker.url, nodes=2, rounds=2, allow=[m.public_key_hex for m in members]
    )
    configs = [
        peer_config(torrent, tmp_path, i, nodes=2, key_dir=tmp_path / "keys" / f"member-{i}")
        for i in range(2)
    ]
    # The outsider holds the torrent and a key of its own, which the allow-list lacks.
    configs.append(
        peer_config(torrent, tmp_path, 2, nodes=2, peer_id="outsider", exchange_timeout=1.5)
    )
    *honest, outsider = run_peers(configs)

    assert outsider.state == "done"
    first, *later = read_records(outsider.out_dir / "metrics.jsonl")
    # It dialled both members and neither let it in: the handshake failed at once.
    assert first["missing"] == {"peer-0": "handshake_failed", "peer-1": "handshake_failed"}
    assert first["timings"]["exchange"] < 1.5  # not the deadline
    for record in later:  # then it backs off from them
        assert record["heard"] == 0
        assert record["skipped"] == {"peer-0": "backed_off", "peer-1": "backed_off"}
    outsider_summary = json.loads((outsider.out_dir / "summary.json").read_text())
    assert outsider_summary["traffic"]["this_process"]["payload_sent"] == 0  # nobody fetched
    assert outsider_summary["traffic"]["this_process"]["payload_received"] == 0

    refused = 0
    for peer in honest:
        records = read_records(peer.out_dir / "metrics.jsonl")
        assert all("outsider" not in r["heard_from"] for r in records)
        assert any(r["skipped"] == {"outsider": "not_allowed"} for r in records)
        assert records[-1]["heard_from"] == [p.peer_id for p in honest if p is not peer]
        summary = json.loads((peer.out_dir / "summary.json").read_text())
        assert summary["security"]["swarm"] == "closed"
        refused += summary["rejections"].get("not_allowed", 0)
        assert set(summary["rejections"]) <= {"not_allowed"}
    assert refused >= 2  # at least one refused handshake per round it tried

    with Ledger(
        ledger_path(outsider.out_dir, "outsider"), outsider.identity, owner="outsider"
    ) as ledger:
        assert ledger.entries() == []
    result = verify_command(*(str(p.out_dir) for p in honest))
    assert result.exit_code == 0, result.output


def test_a_flooding_client_is_refused_and_costs_a_ledger_row_per_state(
    tmp_path: Path, tracker: BackgroundTracker
) -> None:
    """2,000 valid requests to a serving peer while the swarm runs: the peer answers most with
    ``rate_limited`` and logs one ``sent`` row per state the flooder got; honest peers go on."""
    rounds = 3
    torrent = make_torrent(tmp_path, tracker.url, nodes=3, rounds=rounds)
    outcomes: Counter[str] = Counter()

    def flood(peers: Sequence[Peer]) -> None:
        target = peers[0]
        waited = threading.Event()
        for _ in range(1000):  # until it serves its first state, at most 10 s
            if target.transport.serving_round >= 1:
                break
            waited.wait(0.01)
        public, secret = zmq.curve_keypair()
        config = TransportConfig(
            info_hash=target.info_hash,
            peer_id="flooder",
            curve_public_key=public,
            curve_secret_key=secret,
        )
        to = Endpoint(target.peer_id, target.address, public_key=target.identity.curve_public)
        with ZmqTransport(config) as flooder:
            for _ in range(2000):
                try:
                    flooder.fetch(to, round=1, timeout=5.0)
                    outcomes["ok"] += 1
                except PeerRefusedError as exc:
                    outcomes[exc.kind] += 1
                except NetworkError:  # the peer is gone
                    outcomes["gone"] += 1
                    break

    # The flooded peer lingers while requests keep coming, so the whole flood reaches it.
    configs = [peer_config(torrent, tmp_path, 0, nodes=3, linger=30.0)]
    configs += [peer_config(torrent, tmp_path, i, nodes=3) for i in (1, 2)]
    peers = run_peers(configs, alongside=flood)

    refused = outcomes["refused:rate_limited"]
    assert outcomes["ok"] + refused == 2000 and refused >= 1000
    for peer in peers:
        assert peer.state == "done"
        records = read_records(peer.out_dir / "metrics.jsonl")
        assert records[-1]["heard"] == 2  # honest peers still got every state
    summary = json.loads((peers[0].out_dir / "summary.json").read_text())
    assert summary["rejections"]["rate_limited"] == refused
    with Ledger(ledger_path(peers[0].out_dir, "peer-0"), peers[0].identity, owner="peer-0") as led:
        sent = [e for e in led.entries() if e.direction == "sent"]
    flooded = [e for e in sent if e.receiver == "flooder"]
    assert 1 <= len(flooded) <= rounds  # one row per state it got, not one per request
    assert len(sent) <= rounds * 3  # three requesters at most, one row per round each
    report = verify_ledgers([p.out_dir for p in peers])
    assert report.ok, report.problems
