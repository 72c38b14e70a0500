"""Standard BitTorrent trackers: the BEP 3/23 query and answers, hellos, and a real opentracker.

Parsing is tested on bytes (and fuzzed); the client, hellos and the swarm run for real: Debian's
``opentracker`` binary, our tracker thread, ZeroMQ transports and ``fedtorrent peer`` processes.
Tests that need ``opentracker`` skip, with the reason, where it is not installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from fedtorrent.config import TrackerConfig
from fedtorrent.errors import ConfigError, TrackerError
from fedtorrent.net import wire
from fedtorrent.net.identity import PeerIdentity, signed_hello
from fedtorrent.net.torrent import bencode
from fedtorrent.net.tracker import bittorrent
from fedtorrent.net.tracker.client import TrackerAnswer, TrackerClient, TrackerRefusedError
from fedtorrent.net.tracker.server import BackgroundTracker
from fedtorrent.net.transport import TransportConfig
from fedtorrent.net.transport.zmq import ZmqTransport
from fedtorrent.node.hello import RETRY_S, Introductions

INFO_HASH = "2b20" + hashlib.sha256(b"a session").hexdigest()[4:]
"""Its second byte is a space: ``+`` in a query would name another swarm at opentracker."""
OPENTRACKER = shutil.which("opentracker")
needs_opentracker = pytest.mark.skipif(
    OPENTRACKER is None, reason="opentracker is not installed (apt-get install opentracker)"
)


# -- the query and the answers ------------------------------------------------------------------


def test_the_query_truncates_the_info_hash_and_derives_a_stable_peer_id() -> None:
    query = dict(
        bittorrent.announce_query(
            INFO_HASH, "peer-3", port=7001, event="started", numwant=12, uploaded=5,
            downloaded=6, ip=None,
        )
    )  # fmt: skip
    assert query["info_hash"] == bytes.fromhex(INFO_HASH)[:20]
    assert len(query["peer_id"]) == 20 and query["peer_id"].startswith(b"-FT0001-")
    assert query["peer_id"] == bittorrent.peer_id_20("peer-3") != bittorrent.peer_id_20("peer-4")
    assert (query["port"], query["left"], query["compact"], query["event"]) == (
        "7001", "1", "1", "started",
    )  # fmt: skip
    assert (query["uploaded"], query["downloaded"], query["numwant"]) == ("5", "6", "12")
    done = dict(
        bittorrent.announce_query(
            INFO_HASH, "p", port=1, event="completed", numwant=None, uploaded=0, downloaded=0,
            ip="10.0.0.1",
        )
    )  # fmt: skip
    assert done["left"] == "0" and done["ip"] == "10.0.0.1" and "numwant" not in done


def test_compact_ipv4_and_ipv6_lists_parse_to_addresses() -> None:
    peers = bytes([127, 0, 0, 1]) + (7000).to_bytes(2, "big") + bytes([10, 1, 2, 3]) + b"\x00\x50"
    v6 = bytes(15) + b"\x01" + (7002).to_bytes(2, "big")
    answer = {b"interval": 1800, b"complete": 1, b"incomplete": 2, b"peers": peers, b"peers6": v6}
    listing = bittorrent.parse_answer(bencode(answer))
    assert listing.failure is None
    assert (listing.interval, listing.complete, listing.incomplete) == (1800, 1, 2)
    assert listing.addresses == (("127.0.0.1", 7000), ("10.1.2.3", 80), ("::1", 7002))
    assert bittorrent.address_label("::1", 7002) == "[::1]:7002"


def test_dictionary_lists_and_failure_reasons_parse() -> None:
    peers = [
        {b"peer id": b"x" * 20, b"ip": b"192.168.0.9", b"port": 6881},
        {b"ip": b"::ffff:10.0.0.1", b"port": 1},
    ]
    listing = bittorrent.parse_answer(bencode({b"interval": 60, b"peers": peers}))
    assert listing.addresses == (("192.168.0.9", 6881), ("::ffff:a00:1", 1))
    assert (listing.complete, listing.incomplete) == (0, 0)  # optional in BEP 3
    refused = bittorrent.parse_answer(bencode({b"failure reason": b"not\nauthorized"}))
    assert refused.failure == "not?authorized" and refused.addresses == ()


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"", "not bencode"),
        (b"x", "not bencode"),
        (b"l" * 50_000 + b"e" * 50_000, "not a bencoded dictionary"),
        (bencode([1, 2]), "not a bencoded dictionary"),
        (bencode({b"peers": b""}), "interval"),
        (bencode({b"interval": 0, b"peers": b""}), "interval"),
        (bencode({b"interval": 2**40, b"peers": b""}), "interval"),
        (bencode({b"interval": 9, b"complete": -1, b"peers": b""}), "complete"),
        (bencode({b"interval": 9, b"peers": b"12345"}), "6-byte entries"),
        (bencode({b"interval": 9, b"peers": b"\x7f\x00\x00\x01\x00\x00"}), "port 0"),
        (bencode({b"interval": 9, b"peers": 5}), "string or a list"),
        (bencode({b"interval": 9, b"peers": b"", b"peers6": [{}]}), "string or a list"),
        (bencode({b"interval": 9, b"peers6": b"1" * 17}), "18-byte entries"),
        (bencode({b"interval": 9, b"peers": [5]}), "not a dictionary"),
        (bencode({b"interval": 9, b"peers": [{b"ip": b"tracker.example", b"port": 1}]}), "ip"),
        (bencode({b"interval": 9, b"peers": [{b"ip": b"\xff", b"port": 1}]}), "ip"),
        (bencode({b"interval": 9, b"peers": [{b"ip": b"1.2.3.4", b"port": 70000}]}), "port"),
        (bencode({b"interval": 9, b"peers": b"\x01" * 6 * 10_001}), "6-byte entries"),
        (bencode({b"interval": 9, b"peers": [{b"ip": b"1.2.3.4", b"port": 1}] * 10_001}), "more"),
    ],
)
def test_a_malformed_answer_is_one_tracker_error(body: bytes, says: str) -> None:
    with pytest.raises(TrackerError, match=says) as caught:
        bittorrent.parse_answer(body)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200


def test_fuzzed_answers_never_raise_anything_but_tracker_error() -> None:
    rng = random.Random(13)
    good = bencode(
        {
            b"interval": 1800,
            b"peers": bytes(range(12)),
            b"peers6": bytes(18),
            b"failure reason": b"no",
        }
    )
    dictionary = bencode({b"interval": 5, b"peers": [{b"ip": b"1.2.3.4", b"port": 5}]})
    parsed = 0
    for _ in range(3000):
        body = bytearray(rng.choice((good, dictionary)))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(body))
            choice = rng.random()
            if choice < 0.4:
                body[at] = rng.randrange(256)
            elif choice < 0.7:
                del body[at : at + rng.randint(1, 8)]
            else:
                body[at:at] = rng.randbytes(rng.randint(1, 8))
        try:
            bittorrent.parse_answer(bytes(body))
        except TrackerError:
            continue
        parsed += 1
    assert 0 < parsed < 3000  # some mutations still parse, most do not; none crashed


# -- real trackers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


OpenTracker = Callable[..., str]


@pytest.fixture
def opentracker(tmp_path: Path) -> Iterator[OpenTracker]:
    """Start Debian's opentracker for some info-hashes (its build only tracks whitelisted ones).

    Returns the announce URL once the tracker answers; every one started is stopped after.
    """
    if OPENTRACKER is None:
        pytest.skip("opentracker is not installed (apt-get install opentracker)")
    started: list[subprocess.Popen[bytes]] = []

    def start(*info_hashes: str) -> str:
        folder = tmp_path / f"opentracker{len(started)}"
        folder.mkdir()
        folder.chmod(0o755)  # run as root, it drops to nobody and chroots here
        whitelist = folder / "whitelist"
        whitelist.write_text("".join(f"{h[:40]}\n" for h in info_hashes))
        whitelist.chmod(0o644)
        port = free_port()
        command = [OPENTRACKER, "-i", "127.0.0.1", "-p", str(port), "-P", str(port)]
        process = subprocess.Popen(  # -w relative: root chroots into -d before reading it
            [*command, "-d", str(folder), "-w", whitelist.name],
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(process)
        url = f"http://127.0.0.1:{port}/announce"
        deadline = time.monotonic() + 20
        while True:  # ready once it lists a (whitelisted) announce
            probe = TrackerClient(url, timeout=2, retries=0, flavour="bittorrent")
            try:
                probe.announce(info_hashes[0], "probe", port=1, event="started")
                probe.announce(info_hashes[0], "probe", port=1, event="stopped")
                return url
            except TrackerError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)  # polling a process we started until it listens

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.network
@pytest.mark.timeout(60)
def test_the_client_finds_it_talks_to_opentracker_and_peers_see_each_other(
    opentracker: OpenTracker,
) -> None:
    url = opentracker(INFO_HASH)
    one, two = TrackerClient(url, retries=0), TrackerClient(url, retries=0)
    one.announce(INFO_HASH, "peer-1", port=7001, hello_port=8001, event="started")
    answer = two.announce(INFO_HASH, "peer-2", port=7002, hello_port=8002, event="started")
    assert one.flavour == two.flavour == "bittorrent" and answer.flavour == "bittorrent"
    assert {(p.ip, p.port) for p in answer.peers} >= {("127.0.0.1", 8001)}
    assert all(p.pubkey is None and p.peer_id == f"{p.ip}:{p.port}" for p in answer.peers)
    assert answer.interval >= 1
    one.announce(INFO_HASH, "peer-1", port=7001, hello_port=8001, event="stopped")
    after = two.announce(INFO_HASH, "peer-2", port=7002, hello_port=8002)
    assert ("127.0.0.1", 8001) not in {(p.ip, p.port) for p in after.peers}
    other = hashlib.sha256(b"not whitelisted").hexdigest()
    with pytest.raises(TrackerRefusedError, match="not authorized") as refused:
        TrackerClient(url, retries=0).announce(other, "peer-1", port=7001)
    assert refused.value.status == 200


@pytest.mark.network
@pytest.mark.timeout(60)
def test_the_client_keeps_our_flavour_with_our_tracker() -> None:
    with BackgroundTracker(TrackerConfig(port=0, rate_limit=0)) as tracker:
        client = TrackerClient(f"{tracker.url}/announce", retries=0)
        key = PeerIdentity.generate().public_key_hex
        client.announce(INFO_HASH, "peer-1", port=7001, hello_port=8001, pubkey=key)
        answer = TrackerClient(tracker.url, retries=0).announce(INFO_HASH, "peer-2", port=7002)
        assert client.flavour == "fedtorrent" and answer.flavour == "fedtorrent"
        assert [(p.peer_id, p.port, p.pubkey) for p in answer.peers] == [("peer-1", 7001, key)]
        with pytest.raises(TrackerRefusedError, match="64 hex") as refused:
            client.announce("ab", "peer-1", port=7001)  # our refusal: not a sign of BitTorrent
        assert refused.value.json_reason and client.flavour == "fedtorrent"


def test_an_unknown_flavour_is_refused() -> None:
    with pytest.raises(TrackerError, match="flavour"):
        TrackerClient("http://127.0.0.1:1/announce", flavour="udp")


# -- hellos ----------------------------------------------------------------------------------------


def transport(peer_id: str, identity: PeerIdentity | None = None) -> ZmqTransport:
    keys = {}
    if identity is not None:
        keys = {
            "curve_secret_key": identity.curve_secret,
            "curve_public_key": identity.curve_public,
        }
    return ZmqTransport(TransportConfig(info_hash=INFO_HASH, peer_id=peer_id, **keys))  # type: ignore[arg-type]


def listing(*addresses: tuple[str, int]) -> TrackerAnswer:
    from fedtorrent.net.tracker.client import PeerAddress

    peers = tuple(PeerAddress(bittorrent.address_label(ip, p), ip, p) for ip, p in addresses)
    return TrackerAnswer(1800, 0, len(peers), peers, received_at=0.0, flavour="bittorrent")


@pytest.mark.network
@pytest.mark.timeout(60)
def test_a_hello_turns_an_address_into_a_peer_with_a_key() -> None:
    identity = PeerIdentity.generate()
    with transport("peer-a", identity) as a, transport("peer-b") as b:
        assert a.hello_port is not None
        data_port = int(a.address.rsplit(":", 1)[1])
        a.introduce(signed_hello(identity, info_hash=INFO_HASH, peer_id="peer-a", port=data_port))
        hellos = Introductions(b, timeout=5)
        dead = ("127.0.0.1", free_port())
        peers = hellos.listed(listing(("127.0.0.1", a.hello_port), dead))
        assert peers[0].peer_id == "peer-a" and peers[0].port == data_port
        assert peers[0].pubkey == identity.public_key_hex
        assert peers[1].pubkey is None and peers[1].peer_id == f"127.0.0.1:{dead[1]}"
        assert hellos.counts == {"learned": 1, "failed": 1}
        assert hellos.listed(listing(("127.0.0.1", a.hello_port), dead)) == peers
        assert hellos.counts == {"learned": 1, "failed": 1}  # asked once; the dead one backs off
        ours = TrackerAnswer(30, 0, 1, peers[:1], received_at=0.0)
        assert hellos.listed(ours) == peers[:1]  # our tracker's answers pass unchanged


@pytest.mark.network
@pytest.mark.timeout(60)
def test_a_hello_with_another_key_for_a_known_peer_id_is_refused_and_counted() -> None:
    first, second = PeerIdentity.generate(), PeerIdentity.generate()
    with transport("peer-a") as a, transport("peer-a") as impostor, transport("peer-b") as b:
        for server, identity in ((a, first), (impostor, second)):
            assert server.hello_port is not None
            server.introduce(signed_hello(identity, info_hash=INFO_HASH, peer_id="peer-a", port=9))
        clock = [0.0]
        hellos = Introductions(b, timeout=5, clock=lambda: clock[0])
        assert a.hello_port is not None and impostor.hello_port is not None
        peers = hellos.listed(listing(("127.0.0.1", a.hello_port)))
        assert peers[0].pubkey == first.public_key_hex
        peers = hellos.listed(listing(("127.0.0.1", impostor.hello_port)))
        assert peers[0].pubkey is None  # skipped as no_key by cohort selection
        assert hellos.counts["key_changed"] == 1 and hellos.keys == {"peer-a": first.public_key_hex}
        assert b.stats.rejections()["key_changed"] == 1
        clock[0] += RETRY_S  # asked again later: still refused
        hellos.listed(listing(("127.0.0.1", impostor.hello_port)))
        assert hellos.counts["key_changed"] == 2


@contextlib.contextmanager
def raw_hello_socket(frames: list[bytes]) -> Iterator[int]:
    """A plain ROUTER on a free port answering one request with ``frames`` (a lying peer)."""
    context = zmq.Context.instance()
    server = context.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    port = server.bind_to_random_port("tcp://127.0.0.1")

    def serve() -> None:
        if server.poll(10_000):
            identity = server.recv_multipart()[0]
            server.send_multipart([identity, *frames])

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield port
    finally:
        thread.join()
        server.close(linger=0)


@pytest.mark.network
@pytest.mark.timeout(60)
def test_forged_and_foreign_hellos_are_rejected() -> None:
    identity, other = PeerIdentity.generate(), PeerIdentity.generate()
    good = signed_hello(identity, info_hash=INFO_HASH, peer_id="peer-a", port=9)
    sig = wire.decode_single(good, info_hash=INFO_HASH, kind="hello").sig or b""
    forged = wire.encode_hello(
        info_hash=INFO_HASH, sender="peer-a", pubkey=other.public_key, port=9, sig=sig
    )
    foreign = signed_hello(identity, info_hash="ef" * 32, peer_id="peer-a", port=9)
    with transport("peer-b") as b:
        for answer, reason in ((forged, "bad_signature"), (foreign, "wrong_session")):
            hellos = Introductions(b, timeout=5)
            with raw_hello_socket(answer) as port:
                peers = hellos.listed(listing(("127.0.0.1", port)))
            assert peers[0].pubkey is None and hellos.counts == {"failed": 1}
            assert b.stats.rejections()[reason] == 1
    with pytest.raises(ConfigError, match="another peer"), transport("peer-c") as c:
        c.introduce(good)


# -- a swarm on opentracker ------------------------------------------------------------------------

DATA = Path(os.environ.get("FEDTORRENT_DATA", "/work/shared/data"))
SWARM_PEERS, SWARM_ROUNDS = 4, 2


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_swarm_on_opentracker_ends_as_it_does_on_our_tracker(
    tmp_path: Path, opentracker: OpenTracker
) -> None:
    """One MNIST session on opentracker and on our tracker: every peer finishes, same accuracy."""
    from fedtorrent.cli.net import create
    from fedtorrent.metrics.records import read_records
    from fedtorrent.net.torrent import load_torrent
    from fedtorrent.node.swarm import SwarmConfig, peer_folder, run_swarm

    if not (DATA / "mnist").is_dir():
        pytest.skip(f"MNIST is not in {DATA} (set FEDTORRENT_DATA)")
    torrent = tmp_path / "mnist.torrent"
    create(
        output=torrent,
        dataset="mnist",
        model="logreg",
        nodes=SWARM_PEERS,
        rounds=SWARM_ROUNDS,
        cohort=3,
    )  # type: ignore[arg-type]
    url = opentracker(load_torrent(torrent).info_hash)
    results = {}
    for name, tracker in (("opentracker", url), ("ours", None)):
        out = tmp_path / name
        config = SwarmConfig(
            torrent=torrent, out=out, peers=SWARM_PEERS, data_dir=DATA, tracker=tracker,
            exchange_timeout=60,
        )  # fmt: skip
        summary = run_swarm(config, timeout=280, plots=False)
        assert summary["finished"] == SWARM_PEERS, summary["per_peer"]
        for index in range(SWARM_PEERS):
            records = read_records(peer_folder(out, index) / "metrics.jsonl")
            assert [r["round"] for r in records] == list(range(1, SWARM_ROUNDS + 1))
            heard = set().union(*(r["heard_from"] for r in records))
            assert len(heard) == SWARM_PEERS - 1, (name, index, records)
        results[name] = summary["test_accuracy_mean"]
    assert abs(results["opentracker"] - results["ours"]) <= 0.005, results
    assert urllib.parse.urlsplit(url).path == "/announce"
