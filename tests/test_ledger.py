"""The signed, hash-chained ledger, its cross-peer checks, and ``fedtorrent ledger verify``."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedtorrent.cli import app
from fedtorrent.errors import ConfigError, LedgerError
from fedtorrent.ledger import (
    GENESIS_HASH,
    Ledger,
    LedgerReport,
    ledger_path,
    verify_ledgers,
)
from fedtorrent.net.identity import PeerIdentity, new_nonce, sign_update
from fedtorrent.net.transport import TransportConfig

INFO_HASH = "ab" * 32
PEERS = ("a", "b", "c")
IDS = {name: PeerIdentity.from_seed(bytes([i + 1]) * 32) for i, name in enumerate(PEERS)}


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def open_ledger(run: Path, peer: str) -> Ledger:
    return Ledger(ledger_path(run, peer), IDS[peer], owner=peer, info_hash=INFO_HASH).open()


def share(ledgers: dict[str, Ledger], sender: str, rnd: int, payload: str, to: list[str]) -> None:
    """``sender`` signs one state for the round and each receiver logs it."""
    nonce = new_nonce()
    signature = sign_update(
        IDS[sender],
        info_hash=INFO_HASH,
        round=rnd,
        sender=sender,
        receiver=None,
        payload_sha256=digest(payload),
        nonce=nonce,
    )
    for receiver in to:
        ledgers[sender].record_sent(
            round=rnd,
            receiver=receiver,
            payload_sha256=digest(payload),
            num_bytes=len(payload),
            nonce=nonce,
            update_signature=signature,
        )
        ledgers[receiver].record_received(
            round=rnd,
            sender=sender,
            payload_sha256=digest(payload),
            num_bytes=len(payload),
            weight=1 / 3,
            nonce=nonce,
            update_signature=signature,
        )


def honest_run(run: Path, rounds: int = 2) -> None:
    ledgers = {peer: open_ledger(run, peer) for peer in PEERS}
    for rnd in range(rounds):
        for peer in PEERS:
            share(ledgers, peer, rnd, f"{peer}-{rnd}", [p for p in PEERS if p != peer])
    for ledger in ledgers.values():
        ledger.close()


def kinds(report: LedgerReport) -> list[str]:
    return sorted(finding.kind for finding in report.problems)


def test_honest_run_verifies(tmp_path: Path) -> None:
    honest_run(tmp_path)
    report = verify_ledgers([tmp_path], {p: IDS[p].public_key_hex for p in PEERS})
    assert report.ok and not report.warnings
    assert [(s.owner, s.entries, s.chain_ok) for s in report.ledgers] == [
        (p, 8, True) for p in PEERS
    ]


def test_entries_chain_and_reopening_continues_the_chain(tmp_path: Path) -> None:
    with open_ledger(tmp_path, "a") as ledger:
        first = ledger.record_sent(round=0, receiver=None, payload_sha256=digest("x"), num_bytes=1)
    with open_ledger(tmp_path, "a") as ledger:
        second = ledger.record_sent(round=1, receiver=None, payload_sha256=digest("y"), num_bytes=1)
        entries = ledger.entries()
    assert (first.seq, first.prev_hash) == (1, GENESIS_HASH)
    assert (second.seq, second.prev_hash) == (2, first.entry_hash)
    assert entries == [first, second]
    assert verify_ledgers([tmp_path]).ok


def test_a_ledger_belongs_to_one_owner_key_and_session(tmp_path: Path) -> None:
    path = ledger_path(tmp_path, "a")
    Ledger(path, IDS["a"], owner="a", info_hash=INFO_HASH).open().close()
    for identity, owner, info_hash in (
        (IDS["b"], "a", INFO_HASH),
        (IDS["a"], "b", INFO_HASH),
        (IDS["a"], "a", "cd" * 32),
    ):
        with pytest.raises(LedgerError):
            Ledger(path, identity, owner=owner, info_hash=info_hash).open()
    reopened = Ledger(path, IDS["a"], owner="a").open()
    assert reopened.info_hash == INFO_HASH
    reopened.close()
    not_a_db = tmp_path / "junk.ledger.sqlite"
    not_a_db.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(LedgerError):
        Ledger(not_a_db, IDS["a"]).open()


def test_append_refuses_entries_the_owner_is_not_party_to(tmp_path: Path) -> None:
    with open_ledger(tmp_path, "a") as ledger:
        bad = [
            {"direction": "sent", "sender": "b", "receiver": "a"},
            {"direction": "received", "sender": "b", "receiver": "c"},
            {"direction": "lost", "sender": "a", "receiver": None},
        ]
        for fields in bad:
            with pytest.raises(ConfigError):
                ledger.append(round=0, payload_sha256=digest("x"), num_bytes=1, **fields)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            ledger.record_received(
                round=0, sender="b", payload_sha256=digest("x"), num_bytes=1, weight=float("nan")
            )
        with pytest.raises(ConfigError):
            ledger.record_sent(round=-1, receiver=None, payload_sha256=digest("x"), num_bytes=1)
    with pytest.raises(LedgerError, match="not open"):
        ledger.record_sent(round=0, receiver=None, payload_sha256=digest("x"), num_bytes=1)


def tamper(run: Path, peer: str, sql: str) -> None:
    db = sqlite3.connect(ledger_path(run, peer))
    with db:
        db.execute(sql)
    db.close()


def test_an_edited_row_is_tampering(tmp_path: Path) -> None:
    honest_run(tmp_path)
    tamper(tmp_path, "b", "UPDATE entries SET weight = 0.9 WHERE seq = 3")
    report = verify_ledgers([tmp_path])
    assert kinds(report) == ["tampered"]
    (finding,) = report.problems
    assert (finding.owner, finding.seq) == ("b", 3) and "edited" in finding.detail
    assert [s.chain_ok for s in report.ledgers] == [True, False, True]


def test_a_rehashed_edit_fails_the_owner_signature(tmp_path: Path) -> None:
    from fedtorrent.ledger import _entry_hash, _EntryFields, _Meta

    honest_run(tmp_path)
    with Ledger(ledger_path(tmp_path, "b"), IDS["b"], owner="b") as ledger:
        (entry,) = [e for e in ledger.entries() if e.seq == 8]
    fields = _EntryFields(
        **{k: getattr(entry, k) for k in _EntryFields.__dataclass_fields__} | {"weight": 0.99}
    )
    forged_hash = _entry_hash(
        _Meta("b", IDS["b"].public_key_hex, INFO_HASH), 8, entry.prev_hash, fields
    )
    tamper(
        tmp_path,
        "b",
        f"UPDATE entries SET weight = 0.99, entry_hash = '{forged_hash}' WHERE seq = 8",
    )
    report = verify_ledgers([tmp_path])
    assert kinds(report) == ["tampered"]
    assert "signature" in report.problems[0].detail


def test_a_deleted_row_breaks_the_chain(tmp_path: Path) -> None:
    honest_run(tmp_path)
    tamper(tmp_path, "c", "DELETE FROM entries WHERE seq = 2")
    report = verify_ledgers([tmp_path])
    assert "tampered" in kinds(report)
    assert any(f.owner == "c" and "gone" in f.detail for f in report.problems)


def test_planted_equivocation_is_reported(tmp_path: Path) -> None:
    ledgers = {peer: open_ledger(tmp_path, peer) for peer in PEERS}
    share(ledgers, "a", 0, "honest", ["b"])
    share(ledgers, "a", 0, "poisoned", ["c"])  # same sender and round, another state
    share(ledgers, "b", 0, "b-0", ["a", "c"])
    for ledger in ledgers.values():
        ledger.close()
    report = verify_ledgers([tmp_path])
    assert kinds(report) == ["equivocation"]
    (finding,) = report.problems
    assert (finding.owner, finding.round) == ("a", 0)
    assert digest("honest")[:12] in finding.detail and digest("poisoned")[:12] in finding.detail


def test_equivocation_hidden_from_the_senders_ledger_is_still_caught(tmp_path: Path) -> None:
    ledgers = {peer: open_ledger(tmp_path, peer) for peer in PEERS}
    share(ledgers, "a", 0, "honest", ["b"])
    # "a" signs a second state for "c" but keeps it out of its own ledger.
    nonce = new_nonce()
    signature = sign_update(
        IDS["a"],
        info_hash=INFO_HASH,
        round=0,
        sender="a",
        receiver=None,
        payload_sha256=digest("poisoned"),
        nonce=nonce,
    )
    ledgers["c"].record_received(
        round=0,
        sender="a",
        payload_sha256=digest("poisoned"),
        num_bytes=8,
        nonce=nonce,
        update_signature=signature,
    )
    for ledger in ledgers.values():
        ledger.close()
    report = verify_ledgers([tmp_path])
    assert kinds(report) == ["equivocation", "missing"]
    assert "c (signed)" in next(f.detail for f in report.problems if f.kind == "equivocation")


def test_received_without_a_matching_send_is_missing(tmp_path: Path) -> None:
    ledgers = {peer: open_ledger(tmp_path, peer) for peer in ("a", "b")}
    share(ledgers, "a", 0, "a-0", ["b"])
    ledgers["b"].record_received(round=1, sender="a", payload_sha256=digest("?"), num_bytes=1)
    for ledger in ledgers.values():
        ledger.close()
    report = verify_ledgers([tmp_path])
    assert kinds(report) == ["missing"]
    assert (report.problems[0].owner, report.problems[0].round) == ("b", 1)


def test_a_forged_update_signature_is_reported(tmp_path: Path) -> None:
    ledgers = {peer: open_ledger(tmp_path, peer) for peer in ("a", "b")}
    share(ledgers, "a", 0, "a-0", ["b"])
    nonce = new_nonce()
    fake = sign_update(  # "b" claims "a" sent it something, signing with its own key
        IDS["b"],
        info_hash=INFO_HASH,
        round=1,
        sender="a",
        receiver="b",
        payload_sha256=digest("framed"),
        nonce=nonce,
    )
    ledgers["b"].record_received(
        round=1,
        sender="a",
        payload_sha256=digest("framed"),
        num_bytes=6,
        nonce=nonce,
        update_signature=fake,
    )
    for ledger in ledgers.values():
        ledger.close()
    assert kinds(verify_ledgers([tmp_path])) == ["forged"]


def test_keys_are_checked_against_known_keys(tmp_path: Path) -> None:
    honest_run(tmp_path, rounds=1)
    known = {p: IDS[p].public_key_hex for p in PEERS}
    assert verify_ledgers([tmp_path], known).ok
    partial = {"a": known["a"], "b": known["b"]}
    report = verify_ledgers([tmp_path], partial)
    assert kinds(report) == ["unknown_key"] and report.problems[0].owner == "c"
    swapped = {**known, "c": known["a"]}
    assert "unknown_key" in kinds(verify_ledgers([tmp_path], swapped))


def test_lost_sends_are_warnings_and_absent_senders_unchecked(tmp_path: Path) -> None:
    ledgers = {peer: open_ledger(tmp_path, peer) for peer in ("a", "b")}
    ledgers["a"].record_sent(round=0, receiver="b", payload_sha256=digest("lost"), num_bytes=4)
    ledgers["b"].record_received(round=0, sender="z", payload_sha256=digest("z"), num_bytes=1)
    for ledger in ledgers.values():
        ledger.close()
    report = verify_ledgers([tmp_path])
    assert report.ok
    assert sorted(w.kind for w in report.warnings) == ["unchecked", "undelivered"]


def test_unreadable_ledgers_and_empty_runs(tmp_path: Path) -> None:
    honest_run(tmp_path, rounds=1)
    (tmp_path / "junk.ledger.sqlite").write_bytes(b"not sqlite at all" * 10)
    assert kinds(verify_ledgers([tmp_path])) == ["unreadable"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(LedgerError, match="no ledger"):
        verify_ledgers([tmp_path / "empty"])
    with pytest.raises(LedgerError, match="does not exist"):
        verify_ledgers([tmp_path / "nowhere"])


# --- CLI -----------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_exit_codes(tmp_path: Path) -> None:
    honest_run(tmp_path, rounds=1)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({p: IDS[p].public_key_hex for p in PEERS}))
    ok = runner.invoke(app, ["ledger", "verify", str(tmp_path), "--keys", str(keys)])
    assert ok.exit_code == 0, ok.output
    assert "OK" in ok.output and "3 ledgers, 0 problems" in ok.output

    tamper(tmp_path, "a", "UPDATE entries SET num_bytes = 1 WHERE seq = 1")
    failed = runner.invoke(app, ["ledger", "verify", str(tmp_path)])
    assert failed.exit_code == 1
    assert "FAILED" in failed.output and "tampered" in failed.output

    missing = runner.invoke(app, ["ledger", "verify", str(tmp_path / "nowhere")])
    assert missing.exit_code != 0 and isinstance(missing.exception, LedgerError)


def test_cli_strict_fails_on_warnings(tmp_path: Path) -> None:
    with open_ledger(tmp_path, "a") as ledger:
        ledger.record_sent(round=0, receiver="b", payload_sha256=digest("x"), num_bytes=1)
    open_ledger(tmp_path, "b").close()
    assert runner.invoke(app, ["ledger", "verify", str(tmp_path)]).exit_code == 0
    strict = runner.invoke(app, ["ledger", "verify", "--strict", str(tmp_path)])
    assert strict.exit_code == 1 and "undelivered" in strict.output


def test_a_flood_of_requests_adds_one_row_per_state_and_requester(tmp_path: Path) -> None:
    """The serving path as a peer wires it: transport -> ``on_served`` queue -> ``log_served``."""
    import queue

    from fedtorrent.net import wire
    from fedtorrent.net.transport import MemoryNetwork, MemoryTransport, ServedEvent
    from fedtorrent.net.transport.base import MAX_LOGGED_REQUESTERS
    from fedtorrent.node.report import log_served

    served: queue.SimpleQueue[ServedEvent] = queue.SimpleQueue()
    config = TransportConfig(info_hash=INFO_HASH, peer_id="a", request_rate=1e-3)  # no refill
    server = MemoryTransport(MemoryNetwork(), config)
    server.on_served = served.put

    def state(rnd: int) -> list[bytes]:
        return wire.encode_message(
            rnd.to_bytes(4, "big"), info_hash=INFO_HASH, sender="a", round=rnd, num_examples=1
        )

    def ask(sender: str, rnd: int) -> None:
        server._respond(wire.encode_request(info_hash=INFO_HASH, sender=sender, round=rnd))

    requesters = MAX_LOGGED_REQUESTERS + 10
    with server, open_ledger(tmp_path, "a") as ledger:
        for rnd in (1, 2):
            server.publish(state(rnd))
            for _ in range(2000):  # one client asking again and again
                ask("b", rnd)
            for i in range(requesters):  # and many that ask once
                ask(f"x{i}", rnd)
            log_served(ledger, served)
        entries = ledger.entries()
    assert len(entries) == 2 * (MAX_LOGGED_REQUESTERS + 1)  # "b", 255 others, one pooled row
    assert server.stats.rejections()["rate_limited"] == 2000 - 1 - config.request_burst + 2000 - 1
    pooled = [e for e in entries if e.receiver is None]
    assert [e.round for e in pooled] == [1, 2]
    # A requester past the cap that logs what it got is covered by the pooled row.
    with open_ledger(tmp_path, "c") as late:
        late.record_received(
            round=2,
            sender="a",
            payload_sha256=pooled[1].payload_sha256,
            num_bytes=pooled[1].num_bytes,
        )
    report = verify_ledgers([tmp_path])
    assert report.ok, report.problems
