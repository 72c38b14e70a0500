"""The neighbour book and cohort choice on plain data; the exchange's reserve on the twin."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fedtorrent.errors import ConfigError, StateError
from fedtorrent.net import wire
from fedtorrent.net.identity import PeerIdentity, UpdateVerifier
from fedtorrent.net.transport import (
    Endpoint,
    MemoryNetwork,
    MemoryTransport,
    TransportConfig,
)
from fedtorrent.node.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtorrent.node.exchange import Fetcher
from fedtorrent.node.neighbours import (
    MAX_NUMWANT,
    BookSettings,
    Candidate,
    NeighbourBook,
)
from fedtorrent.state import encode_state

pytestmark = pytest.mark.timeout(30)


def cand(name: str) -> Candidate:
    return Candidate(name, f"tcp://10.0.0.1:{abs(hash(name)) % 60000 + 1}", "ab" * 32)


def names(candidates: list[Candidate]) -> list[str]:
    return [c.peer_id for c in candidates]


def test_with_no_history_the_cohort_is_the_trackers_first_listed() -> None:
    book = NeighbourBook()
    listed = [cand(f"p{i}") for i in range(10)]
    plan = book.plan(listed, round=1, cohort_size=4)
    assert names(plan.cohort) == ["p0", "p1", "p2", "p3"]
    assert names(plan.reserve) == [f"p{i}" for i in range(4, 10)]
    assert plan.skipped == {}
    assert plan.first_contact == {f"p{i}" for i in range(10)}


def test_an_honest_swarm_where_everyone_answers_keeps_the_trackers_choice() -> None:
    book = NeighbourBook()
    everyone = [cand(f"p{i}") for i in range(8)]
    book.record(1, {c.peer_id: "fresh" for c in everyone}, everyone)
    for order in ([3, 1, 7, 0, 2, 6, 5, 4], [5, 4, 3, 2, 1, 0, 7, 6]):
        listed = [everyone[i] for i in order]
        plan = book.plan(listed, round=2, cohort_size=4)
        assert names(plan.cohort) == names(listed[:4])  # the tracker's (random) sample
        assert plan.first_contact == frozenset()


def test_failures_back_off_exponentially_up_to_the_cap() -> None:
    book = NeighbourBook(BookSettings(max_backoff=4))
    dead = cand("dead")
    skipped_until = []
    round = 1
    for _ in range(5):
        while book.plan([dead], round=round, cohort_size=1).skipped:
            round += 1
        book.record(round, {"dead": "unreachable"}, [dead])
        skipped_until.append(book.entries["dead"].skip_until - round)
        round += 1
    assert skipped_until == [1, 2, 4, 4, 4]
    assert book.entries["dead"].outcomes["unreachable"] == 5
    plan = book.plan([dead], round=book.entries["dead"].skip_until, cohort_size=1)
    assert plan.skipped == {"dead": "backed_off"} and plan.cohort == []


def test_a_rejection_backs_off_longer_a_good_neighbours_first_fast_failure_is_forgiven() -> None:
    book = NeighbourBook()
    liar, good = cand("liar"), cand("good")
    book.record(1, {"good": "fresh", "liar": "rejected:bad_sig"}, [liar, good])
    assert book.entries["liar"].skip_until == 1 + 4
    book.record(2, {"good": "unreachable"}, [good])
    assert book.entries["good"].skip_until == 0  # one glitch that cost nothing: still dialled
    plan = book.plan([good], round=3, cohort_size=1)
    assert names(plan.cohort) == ["good"]
    assert "good" in plan.first_contact  # it failed last time: the short first-contact timeout
    book.record(3, {"good": "unreachable"}, [good])
    assert book.entries["good"].skip_until == 3 + 2  # second failure in a row: backed off
    book.record(6, {"good": "stale"}, [good])
    assert book.entries["good"].good and book.entries["good"].skip_until == 0
    assert "good" not in book.plan([good], round=7, cohort_size=1).first_contact


def test_a_timeout_is_never_forgiven_a_dead_neighbour_costs_one_deadline() -> None:
    """A neighbour silent for a whole deadline is skipped at once, until it is listed anew."""
    book = NeighbourBook()
    dead, other = cand("dead"), cand("other")
    book.record(1, {"dead": "fresh", "other": "fresh"}, [dead, other])
    book.record(2, {"dead": "timeout", "other": "fresh"}, [dead, other])
    plan = book.plan([dead, other], round=3, cohort_size=2)
    assert names(plan.cohort) == ["other"] and plan.skipped == {"dead": "backed_off"}
    moved = Candidate("dead", "tcp://10.0.0.9:1", dead.pubkey)  # it announced again, elsewhere
    plan = book.plan([moved, other], round=3, cohort_size=2)
    assert sorted(names(plan.cohort)) == ["dead", "other"] and "dead" in plan.first_contact


def test_too_stale_is_neutral_and_alive() -> None:
    book = NeighbourBook()
    behind = cand("behind")
    book.record(1, {"behind": "fresh"}, [behind])
    book.record(2, {"behind": "too_stale"}, [behind])
    entry = book.entries["behind"]
    assert entry.failures == 0 and entry.skip_until == 0 and book.alive("behind")


def test_not_ready_is_neutral_and_alive() -> None:
    book = NeighbourBook()
    starting = cand("starting")
    book.record(1, {"starting": "refused:not_ready"}, [starting])
    entry = book.entries["starting"]
    assert (entry.answers, entry.failures, entry.skip_until) == (0, 0, 0)
    assert book.alive("starting") and not book.alive("nobody")
    plan = book.plan([starting], round=2, cohort_size=1)
    assert names(plan.cohort) == ["starting"] and "starting" in plan.first_contact


def test_good_neighbours_come_first_even_unlisted_and_exploration_keeps_room() -> None:
    book = NeighbourBook(BookSettings(explore_share=0.25))
    good = [cand(f"g{i}") for i in range(6)]
    book.record(1, {c.peer_id: "fresh" for c in good[:3]}, good[:3])
    book.record(2, {c.peer_id: "fresh" for c in good[3:]}, good[3:])
    fakes = [cand(f"f{i}") for i in range(20)]
    # The tracker lists only fakes and g1: g1 first, then the other good ones the book
    # remembers (most recently good first), leaving floor(0.25 * 4) = 1 slot to explore.
    plan = book.plan([*fakes[:10], good[1]], round=3, cohort_size=4)
    assert names(plan.cohort) == ["g1", "g3", "g4", "f0"]
    assert names(plan.reserve)[:12] == [*(f"f{i}" for i in range(1, 10)), "g5", "g0", "g2"]
    # Without unknown candidates there is nothing to explore: good ones fill every slot.
    assert names(book.plan([], round=3, cohort_size=4).cohort) == ["g3", "g4", "g5", "g0"]


def test_a_flood_of_dead_candidates_cannot_fill_the_cohort_once_a_good_one_is_known() -> None:
    book = NeighbourBook()
    honest = cand("honest")
    fakes = [cand(f"fake-{i}") for i in range(1500)]
    book.record(1, {"honest": "fresh"}, [honest])
    for round in range(2, 30):
        listed = fakes[(round * 80) % 1500 :][:80]  # the tracker lists only fakes
        plan = book.plan(listed, round=round, cohort_size=20)
        assert names(plan.cohort)[0] == "honest"
        book.record(round, {c.peer_id: "unreachable" for c in plan.cohort[1:]}, plan.cohort[1:])
        book.record(round, {"honest": "fresh"}, [honest])
        assert len(book.entries) <= book.settings.max_entries


def test_a_new_key_makes_a_stranger_and_a_new_address_earns_one_retry() -> None:
    book = NeighbourBook()
    peer = cand("p")
    book.record(1, {"p": "unreachable"}, [peer])
    book.record(3, {"p": "unreachable"}, [peer])
    assert book.entries["p"].skip_until == 5
    moved = Candidate("p", "tcp://10.0.0.2:9", peer.pubkey)
    plan = book.plan([moved], round=4, cohort_size=1)
    assert plan.cohort == [moved] and book.entries["p"].failures == 2  # failures are kept
    other_key = Candidate("p", moved.address, "cd" * 32)
    plan = book.plan([other_key], round=4, cohort_size=1)
    assert plan.cohort == [other_key] and "p" not in book.entries


def test_numwant_first_contact_and_settings() -> None:
    book = NeighbourBook()
    assert book.numwant(2) == MAX_NUMWANT  # no good neighbour known: as many as the tracker gives
    good = [cand(f"g{i}") for i in range(20)]
    book.record(1, {c.peer_id: "fresh" for c in good}, good)
    assert book.numwant(20) == 80 and book.numwant(2) == 8 and book.numwant(21) == MAX_NUMWANT
    book.entries.clear()
    assert book.first_contact_s() is None  # nothing measured: the whole deadline
    book.record(1, {}, [], rtts={"a": 0.01, "b": 0.02})
    assert book.first_contact_s() == 1.0  # the floor
    book.record(2, {}, [], rtts={"a": 0.5})
    assert book.first_contact_s() == pytest.approx(2.0)
    with pytest.raises(ConfigError):
        BookSettings(explore_share=1.0)
    with pytest.raises(ConfigError):
        BookSettings(max_backoff=0)


def test_the_book_round_trips_and_refuses_bad_state() -> None:
    book = NeighbourBook()
    book.record(1, {"a": "fresh", "b": "rejected:bad_sig"}, [cand("a"), cand("b")], rtts={"a": 0.1})
    again = NeighbourBook()
    again.load_state_dict(book.state_dict())
    assert again.state_dict() == book.state_dict()
    assert again.entries["b"].outcomes == {"rejected:bad_sig": 1}
    for bad in (
        {"entries": "x"},
        {"entries": [{"peer_id": "a"}]},
        {"entries": [{**book.entries["a"].to_dict(), "failures": -1}]},
        {"entries": [{**book.entries["a"].to_dict(), "outcomes": {"fresh": True}}]},
        {"rtts": [float("nan")]},
    ):
        with pytest.raises(StateError):
            NeighbourBook().load_state_dict(bad)


def test_the_book_forgets_old_failures_first() -> None:
    book = NeighbourBook(BookSettings(max_entries=3))
    book.record(1, {"good": "fresh"}, [cand("good")])
    for round, name in enumerate(["x", "y", "z"], start=2):
        book.record(round, {name: "timeout"}, [cand(name)])
    assert set(book.entries) == {"good", "y", "z"}


# -- the exchange: reserve and first contact, on the in-memory twin -------------------------------

INFO_HASH = "ab" * 32
LIKE = {"w": torch.zeros(3)}


@pytest.fixture
def network() -> Iterator[MemoryNetwork]:
    yield MemoryNetwork()


def serving(network: MemoryNetwork, peer_id: str) -> tuple[MemoryTransport, PeerIdentity]:
    identity = PeerIdentity.generate()
    transport = MemoryTransport(network, TransportConfig(info_hash=INFO_HASH, peer_id=peer_id))
    transport.start()
    from fedtorrent.net.identity import new_nonce, sign_update
    from fedtorrent.state import state_digest

    payload, nonce = encode_state(LIKE), new_nonce()
    sig = sign_update(
        identity, info_hash=INFO_HASH, round=1, sender=peer_id, receiver=None,
        payload_sha256=state_digest(payload), nonce=nonce,
    )  # fmt: skip
    transport.publish(
        wire.encode_message(
            payload,
            info_hash=INFO_HASH,
            sender=peer_id,
            round=1,
            num_examples=1,
            sig=sig,
            nonce=nonce,
            pubkey=identity.public_key,
            payload_sha256=state_digest(payload),
        )
    )
    return transport, identity


def test_members_that_fail_fast_are_replaced_from_the_reserve_a_silent_one_is_cut_short(
    network: MemoryNetwork,
) -> None:
    servers = [serving(network, f"good-{i}") for i in range(2)]

    def garbage(request: list[bytes]) -> list[bytes]:
        return [b"\xc1 not msgpack"]

    for i in range(6):
        network.add_raw_peer(f"mem://liar-{i}", garbage)
    network.silence("mem://silent")
    client = MemoryTransport(network, TransportConfig(info_hash=INFO_HASH, peer_id="me"))
    with client, ThreadPoolExecutor(3) as executor:
        fetcher = Fetcher(
            transport=client,
            executor=executor,
            like=LIKE,
            verifier=UpdateVerifier(info_hash=INFO_HASH, last_round=5),
            keys={f"good-{i}": identity.public_key_hex for i, (_, identity) in enumerate(servers)},
            stop=threading.Event(),
        )
        liars = [Endpoint(f"liar-{i}", f"mem://liar-{i}") for i in range(6)]
        good = [Endpoint(f"good-{i}", t.address) for i, (t, _) in enumerate(servers)]
        silent = Endpoint("silent", "mem://silent")
        start = time.monotonic()
        exchange = fetcher.exchange(
            [*liars[:2], silent],
            round=1,
            deadline=time.monotonic() + 5.0,
            skipped={},
            reserve=[*liars[2:], *good],
            first_contact={"silent"},
            first_contact_s=0.3,
        )
        elapsed = time.monotonic() - start
    assert set(exchange.replies) == {"good-0", "good-1"}
    assert exchange.dialled[:3] == ["liar-0", "liar-1", "silent"]
    assert set(exchange.dialled) == {"silent", *(e.peer_id for e in liars + good)}
    assert exchange.missing["silent"] == "timeout"  # its first contact window, not the deadline
    assert exchange.outcomes(1)["good-0"] == "fresh"
    assert exchange.outcomes(1)["liar-0"] == "rejected:bad_header"
    assert elapsed < 2.0
    for transport, _ in servers:
        transport.close()


def test_the_checkpoint_carries_the_book(tmp_path: Path) -> None:
    book = NeighbourBook()
    book.record(3, {"a": "fresh", "b": "unreachable"}, [cand("a"), cand("b")], rtts={"a": 0.2})
    state = {"w": torch.ones(2)}
    save_checkpoint(
        tmp_path,
        Checkpoint(info_hash=INFO_HASH, peer_id="me", round=3, state=state,
                   neighbours=book.state_dict()),
    )  # fmt: skip
    loaded = load_checkpoint(tmp_path, info_hash=INFO_HASH, like=state)
    again = NeighbourBook()
    again.load_state_dict(loaded.neighbours)
    assert again.state_dict() == book.state_dict()
    assert again.plan([cand("b")], round=4, cohort_size=1).skipped == {"b": "backed_off"}


def test_a_dry_reserve_is_refilled_from_the_tracker_a_bounded_number_of_times(
    network: MemoryNetwork,
) -> None:
    server, identity = serving(network, "good")

    def garbage(request: list[bytes]) -> list[bytes]:
        return [b"\xc1 not msgpack"]

    for i in range(3):
        network.add_raw_peer(f"mem://liar-{i}", garbage)
    asked: list[set[str]] = []

    def refill(dialled: set[str]) -> tuple[list[Endpoint], frozenset[str]]:
        asked.append(set(dialled))
        if len(asked) == 1:  # the first new sample: one more liar and the honest peer
            return [
                Endpoint("liar-2", "mem://liar-2"),
                Endpoint("good", server.address),
            ], frozenset()
        return [], frozenset()

    client = MemoryTransport(network, TransportConfig(info_hash=INFO_HASH, peer_id="me"))
    with client, ThreadPoolExecutor(2) as executor:
        fetcher = Fetcher(
            transport=client, executor=executor, like=LIKE,
            verifier=UpdateVerifier(info_hash=INFO_HASH, last_round=5),
            keys={"good": identity.public_key_hex}, stop=threading.Event(),
        )  # fmt: skip
        exchange = fetcher.exchange(
            [Endpoint(f"liar-{i}", f"mem://liar-{i}") for i in range(2)],
            round=1,
            deadline=time.monotonic() + 5.0,
            skipped={},
            refill=refill,
        )
    assert list(exchange.replies) == ["good"]
    assert exchange.dialled == ["liar-0", "liar-1", "liar-2", "good"]
    assert asked[0] <= {"liar-0", "liar-1"} and len(asked) <= 2  # stops once nothing is new
    server.close()


def test_the_exchange_counts_retries_failed_requests_and_the_time_lost(
    network: MemoryNetwork,
) -> None:
    good, identity = serving(network, "good")
    late = MemoryTransport(network, TransportConfig(info_hash=INFO_HASH, peer_id="late"))
    late.start()  # never publishes: every request is refused as not_ready
    network.silence("mem://silent")
    client = MemoryTransport(network, TransportConfig(info_hash=INFO_HASH, peer_id="me"))
    with client, ThreadPoolExecutor(3) as executor:
        fetcher = Fetcher(
            transport=client, executor=executor, like=LIKE,
            verifier=UpdateVerifier(info_hash=INFO_HASH, last_round=5),
            keys={"good": identity.public_key_hex}, stop=threading.Event(),
        )  # fmt: skip
        endpoints = [
            Endpoint("good", good.address),
            Endpoint("late", late.address),
            Endpoint("silent", "mem://silent"),
        ]
        start = time.monotonic()
        faulty = fetcher.exchange(
            endpoints, round=1, deadline=time.monotonic() + 0.6, skipped={}
        ).costs()
        elapsed = time.monotonic() - start
        healthy = fetcher.exchange(
            endpoints[:1], round=1, deadline=time.monotonic() + 5.0, skipped={}
        ).costs()
    polls = faulty["failed"]["refused:not_ready"]
    assert polls >= 2  # the late peer was asked again and again until the deadline
    assert faulty["failed"] == {"refused:not_ready": polls, "timeout": 1}
    assert faulty["requests"] == 1 + polls + 1
    assert faulty["retries"] == polls - 1
    # The good state came at once; the rest of the deadline went on the other two.
    assert 0.4 <= faulty["time_lost_s"] <= elapsed
    assert healthy["requests"] == 1 and healthy["retries"] == 0 and healthy["failed"] == {}
    assert healthy["time_lost_s"] < 0.2
    good.close()
    late.close()


# -- the asynchronous mode: each member asked once ------------------------------------------------


def behind_peer(
    network: MemoryNetwork, peer_id: str, round: int, *, answers: int | None = None
) -> tuple[list[float], str]:
    """A raw peer whose newest state is of ``round``; returns the times it was asked, its key.

    With ``answers`` it goes silent (killed) after that many answers.
    """
    from fedtorrent.net.identity import new_nonce, sign_update
    from fedtorrent.state import state_digest

    identity = PeerIdentity.generate()
    payload, nonce = encode_state(LIKE), new_nonce()
    signed = {"info_hash": INFO_HASH, "round": round, "sender": peer_id}
    sig = sign_update(
        identity, receiver=None, payload_sha256=state_digest(payload), nonce=nonce, **signed
    )
    frames = wire.encode_message(payload, num_examples=1, sig=sig, nonce=nonce, **signed)
    asked: list[float] = []

    def respond(request: list[bytes]) -> list[bytes]:
        asked.append(time.monotonic())
        if answers is not None and len(asked) >= answers:
            network.silence(f"mem://{peer_id}")
        return list(frames)

    network.add_raw_peer(f"mem://{peer_id}", respond)
    return asked, identity.public_key_hex


def test_the_asynchronous_mode_asks_once_keeps_at_most_k_behind_and_replaces_older_ones(
    network: MemoryNetwork,
) -> None:
    peers = {name: behind_peer(network, name, round) for name, round in
             (("two-behind", 1), ("ahead", 5), ("three-behind", 0), ("spare", 2))}  # fmt: skip
    client = MemoryTransport(network, TransportConfig(info_hash=INFO_HASH, peer_id="me"))

    def endpoint(name: str) -> Endpoint:
        return Endpoint(name, f"mem://{name}")

    with client, ThreadPoolExecutor(3) as executor:
        fetcher = Fetcher(
            transport=client, executor=executor, like=LIKE,
            verifier=UpdateVerifier(info_hash=INFO_HASH, last_round=9),
            keys={name: key for name, (_, key) in peers.items()}, stop=threading.Event(),
        )  # fmt: skip
        start = time.monotonic()
        exchange = fetcher.exchange(
            [endpoint("two-behind"), endpoint("ahead"), endpoint("three-behind")],
            round=3,
            deadline=start + 10.0,
            skipped={},
            reserve=[endpoint("spare")],
            max_staleness=2,
        )
        elapsed = time.monotonic() - start
    assert elapsed < 2.0  # nobody waited for: far below the deadline
    assert {p: r.header.round for p, r in exchange.replies.items()} == {
        "two-behind": 1, "ahead": 5, "spare": 2,
    }  # fmt: skip
    assert exchange.missing == {"three-behind": "too_stale"}  # replaced by the reserve peer
    assert exchange.outcomes(3)["two-behind"] == "stale"
    assert exchange.outcomes(3)["ahead"] == "fresh"
    assert [len(asked) for asked, _ in peers.values()] == [1, 1, 1, 1]  # each asked once
    assert set(exchange.arrived) == set(exchange.replies)
    assert all(start <= t <= start + elapsed for t in exchange.arrived.values())


def test_the_synchronous_mode_waits_for_a_peer_behind_and_its_lag_is_the_deadline(
    network: MemoryNetwork,
) -> None:
    asked, key = behind_peer(network, "behind", 1)
    client = MemoryTransport(network, TransportConfig(info_hash=INFO_HASH, peer_id="me"))
    with client, ThreadPoolExecutor(1) as executor:
        fetcher = Fetcher(
            transport=client, executor=executor, like=LIKE,
            verifier=UpdateVerifier(info_hash=INFO_HASH, last_round=9),
            keys={"behind": key}, stop=threading.Event(),
        )  # fmt: skip
        start = time.monotonic()
        exchange = fetcher.exchange(
            [Endpoint("behind", "mem://behind")], round=2, deadline=start + 0.6, skipped={}
        )
    assert exchange.outcomes(2) == {"behind": "stale"}
    assert len(asked) >= 3  # re-asked while it stayed behind
    assert 0.55 <= exchange.arrived["behind"] - start <= 1.2  # a censored lag: the deadline


def test_a_neighbour_that_answers_then_goes_silent_is_a_timeout_with_its_state_kept(
    network: MemoryNetwork,
) -> None:
    asked, key = behind_peer(network, "dying", 1, answers=1)
    assert not asked
    client = MemoryTransport(network, TransportConfig(info_hash=INFO_HASH, peer_id="me"))
    with client, ThreadPoolExecutor(1) as executor:
        fetcher = Fetcher(
            transport=client, executor=executor, like=LIKE,
            verifier=UpdateVerifier(info_hash=INFO_HASH, last_round=9),
            keys={"dying": key}, stop=threading.Event(),
        )  # fmt: skip
        exchange = fetcher.exchange(
            [Endpoint("dying", "mem://dying")], round=2, deadline=time.monotonic() + 1.6,
            skipped={},
        )  # fmt: skip
    assert exchange.replies["dying"].header.round == 1  # its last state is still mixed
    assert exchange.silent == {"dying"} and exchange.outcomes(2) == {"dying": "timeout"}
    assert len(asked) == 1  # it answered once; the next request went unanswered
