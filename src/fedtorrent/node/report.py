"""What a peer writes about itself: metric records, ledger entries, status and summary files.

Kept apart from the round so that the round reads as train, exchange, mix, record. Status and
summary are drawn from a :class:`PeerSnapshot`, plain values the peer copies out of itself
(``Peer.snapshot``); this module never sees the ``Peer``.
"""

from __future__ import annotations

import math
import os
import queue
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtorrent.metrics.records import RecordWriter, read_records, write_json

if TYPE_CHECKING:
    import torch

    from fedtorrent.ledger import Ledger
    from fedtorrent.net.identity import PeerIdentity
    from fedtorrent.net.torrent import Session
    from fedtorrent.net.transport import Reply, ServedEvent
    from fedtorrent.node.exchange import Exchange
    from fedtorrent.training.evaluate import Metrics

METRIC_FIELDS = (
    "round",
    "peer_id",
    "train_loss",
    "lr",
    "val_accuracy",
    "test_accuracy",
    "test_loss",
    "test_precision",
    "test_recall",
    "test_f1",
    "self_weight",
    "heard",
    "cohort_size",
    "bytes_sent",
    "bytes_received",
    "rejected",
    "tracker",
    "tracker_rtt_s",
    "duration_s",
)
"""Scalar columns of ``metrics.csv``; ``metrics.jsonl`` keeps every key (cohort, trust, ...)."""


@dataclass(frozen=True)
class NeighbourCounts:
    """The neighbour book (``NeighbourBook``) at one moment, as :func:`neighbour_totals` ends.

    ``heard``: neighbours that ever brought a verified state; ``known``: neighbours in the book;
    ``backed_off``: how many of them the next round would skip.
    """

    heard: int = 0
    known: int = 0
    backed_off: int = 0


@dataclass(frozen=True)
class PeerSnapshot:
    """What ``status.json``, ``summary.json`` and the traffic totals read of a peer, copied out.

    Built by ``Peer.snapshot``. A peer whose start failed part way has only what it got so far:
    the fields it never reached are None (or empty), and :func:`write_status` writes them so;
    :func:`summary` needs a peer that got as far as its transport (``traffic`` not None).
    """

    out_dir: Path | None
    """None before start (then nothing is written)."""
    peer_id: str
    """Empty until start has chosen it."""
    state: str
    error: str | None
    round_done: int
    records: Sequence[Mapping[str, Any]]
    """The round records so far (a copy of the list; records are never changed once written)."""
    rounds: int | None = None
    address: str | None = None
    traffic: Mapping[str, Any] | None = None
    """The transport's ``stats.snapshot()`` (this process only); None before it exists."""
    rejections: Mapping[str, int] = field(default_factory=dict)
    """The transport's rejections by reason (this process only)."""
    base_totals: Mapping[str, Any] = field(default_factory=dict)
    """Bytes and rejections of earlier processes, from the checkpoint (``--resume``)."""
    tracker_online: bool | None = None
    tracker_counts: Mapping[str, int] = field(default_factory=dict)
    tracker_rtts: Sequence[tuple[int, float]] = ()
    """(peer's round, seconds) of each announce the tracker answered."""
    info_hash: str | None = None
    session: Session | None = None
    public_key: str | None = None
    """This peer's Ed25519 key, hex."""
    ledger: str | None = None
    """The ledger's file name."""
    attack: str | None = None
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    privacy_unit: str | None = None
    """What the DP guarantee protects: ``"node"`` (the whole local dataset) or ``"example"``."""
    max_epsilon: float | None = None
    """``--dp-max-epsilon`` (None: no cap)."""
    stopped: str | None = None
    """Why a ``done`` peer ended before its last round (``"privacy_budget"``); else None."""
    train_examples: int | None = None
    neighbours: NeighbourCounts = field(default_factory=NeighbourCounts)


def open_records(
    out_dir: Path, *, resume: bool, round_done: int
) -> tuple[RecordWriter, list[dict[str, Any]]]:
    """Open ``metrics.jsonl``; on resume keep records up to the checkpoint (later ones are redone).

    Returns:
        The open writer and the records kept (already written again).
    """
    jsonl, csv_path = out_dir / "metrics.jsonl", out_dir / "metrics.csv"
    kept: list[dict[str, Any]] = []
    if resume and jsonl.exists():
        kept = [
            r
            for r in read_records(jsonl)
            if isinstance(r.get("round"), int) and r["round"] <= round_done
        ]
    for path in (jsonl, csv_path):
        path.unlink(missing_ok=True)
    writer = RecordWriter(out_dir, name="metrics", fields=METRIC_FIELDS).open()
    for record in kept:
        writer.write(record)
    return writer, kept


def open_ledger(
    out_dir: Path, identity: PeerIdentity, *, peer_id: str, info_hash: str, resume: bool
) -> Ledger:
    """This peer's ledger; a fresh run (no ``--resume``) starts a fresh one, as its records."""
    from fedtorrent.ledger import Ledger, ledger_path  # noqa: PLC0415

    path = ledger_path(out_dir, peer_id)
    if not resume:
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
    return Ledger(path, identity, owner=peer_id, info_hash=info_hash).open()


def log_served(ledger: Ledger, served: queue.SimpleQueue[ServedEvent]) -> None:
    """Append a ``sent`` entry for every hand-out the transport reported since last time.

    The transport reports each state once per requester (and past ``MAX_LOGGED_REQUESTERS``
    of them once with requester None, logged as sent to everyone), so this adds at most a few
    rows per round however often peers ask.
    """
    while True:
        try:
            event = served.get_nowait()
        except queue.Empty:
            return
        header = event.header
        ledger.record_sent(
            round=header.round,
            receiver=event.requester,
            payload_sha256=header.payload_sha256,
            num_bytes=header.payload_len,
            nonce=header.nonce,
            update_signature=header.sig,
        )


def log_mixed(
    ledger: Ledger,
    heard: Sequence[str],
    exchange: Exchange,
    weights: torch.Tensor | None,
    *,
    screened: Mapping[str, Reply] | None = None,
) -> None:
    """Append a ``received`` entry for every mixed state with the weight it got.

    States the plausibility screen rejected (``screened``) are logged too, with weight 0.0: the
    entry keeps the sender's signed digest as proof of what it sent. A weight that is not a
    finite number (which the mixing code never produces) is logged as None, never refused.
    """
    values = weights.tolist() if weights is not None else None
    entries = [
        (p, exchange.replies[p].header, float(values[1 + i]) if values is not None else None)
        for i, p in enumerate(heard)
    ]
    entries += [(p, reply.header, 0.0) for p, reply in (screened or {}).items()]
    for peer_id, header, weight in entries:
        ledger.record_received(
            round=header.round,
            sender=peer_id,
            payload_sha256=header.payload_sha256,
            num_bytes=header.payload_len,
            weight=weight if weight is not None and math.isfinite(weight) else None,
            nonce=header.nonce,
            update_signature=header.sig,
        )


def traffic_totals(peer: PeerSnapshot) -> dict[str, Any]:
    """Bytes and rejections since round 1, across restarts (what the checkpoint carries)."""
    if peer.traffic is None:
        return {"bytes_sent": 0, "bytes_received": 0, "rejections": {}}
    flow = peer.traffic["totals"]
    base = peer.base_totals
    rejections = Counter(base.get("rejections", {})) + Counter(peer.rejections)
    return {
        "bytes_sent": int(base.get("bytes_sent", 0)) + flow["header_sent"] + flow["payload_sent"],
        "bytes_received": int(base.get("bytes_received", 0))
        + flow["header_received"]
        + flow["payload_received"],
        "rejections": dict(rejections),
    }


def last_accuracy(records: Sequence[Mapping[str, Any]]) -> float | None:
    """The latest finite test accuracy of ``records``; None when there is none."""
    for record in reversed(records):
        value = record.get("test_accuracy")
        if isinstance(value, float) and math.isfinite(value):
            return value
    return None


def write_status(peer: PeerSnapshot) -> None:
    """Rewrite ``status.json`` (what the swarm launcher and dashboards poll); no-op before start."""
    if peer.out_dir is None:
        return
    totals = traffic_totals(peer)
    write_json(
        peer.out_dir / "status.json",
        {
            "peer_id": peer.peer_id,
            "pid": os.getpid(),
            "address": peer.address,
            "round": peer.round_done,
            "rounds": peer.rounds,
            "accuracy": last_accuracy(peer.records),
            "bytes_sent": totals["bytes_sent"],
            "bytes_received": totals["bytes_received"],
            "rejections": totals["rejections"],
            "rejected": sum(totals["rejections"].values()),
            "tracker": {True: "ok", False: "down", None: "unknown"}[peer.tracker_online],
            "state": peer.state,
            "stopped": peer.stopped,
            "epsilon": peer.epsilon,
            "error": peer.error,
            "updated_at": time.time(),
        },
    )


def summary(peer: PeerSnapshot, *, test: Metrics | Mapping[str, float] | None) -> dict[str, Any]:
    """The run's ``summary.json``: final scores (``test``), traffic, security and tracker.

    ``stopped`` says why a ``done`` peer ended before its last round (``"privacy_budget"``:
    the next round would have spent more than ``security.max_epsilon``); ``security`` holds the
    epsilon spent, its ``delta`` and ``privacy_unit`` (None without DP).

    ``test`` is a built-in session's :class:`Metrics`, or a task's scores (every metric it
    returns and ``loss``), written as they are.

    Raises:
        ValueError: ``peer`` never got as far as its transport (no ``traffic`` or ``session``).
    """
    traffic, session = peer.traffic, peer.session
    if traffic is None or session is None:
        raise ValueError("a summary needs a peer that started its transport")
    totals = traffic_totals(peer)
    rtts = [s for s in traffic["rtt_s"].values() for _, s in s]
    return {
        "peer_id": peer.peer_id,
        "info_hash": peer.info_hash,
        "session": session.name,
        "state": peer.state,
        "stopped": peer.stopped,
        "error": peer.error,
        "rounds": peer.rounds,
        "rounds_done": peer.round_done,
        "mixing": session.mixing.rule,
        "train_examples": peer.train_examples,
        "test": None
        if test is None
        else dict(test)
        if isinstance(test, Mapping)
        else test.to_dict(),
        "traffic": {
            "bytes_sent": totals["bytes_sent"],
            "bytes_received": totals["bytes_received"],
            "this_process": traffic["totals"],
            "per_peer": traffic["per_peer"],
            "failures": traffic["failures"],
            "central_server_bytes": 2 * session.state_size * peer.round_done,
        },
        "rejections": totals["rejections"],
        "rejections_per_peer": traffic["rejections_per_peer"],
        "security": {
            "public_key": peer.public_key,
            "swarm": "closed" if session.closed else "open",
            "ledger": peer.ledger,
            "attack": peer.attack,
            "epsilon": peer.epsilon,
            "delta": peer.delta,
            "privacy_unit": peer.privacy_unit,
            "max_epsilon": peer.max_epsilon,
            "noise_multiplier": peer.noise_multiplier,
            "weight_given": weight_given(peer.records),
        },
        "neighbours": neighbour_totals(peer.records, peer.neighbours),
        "exchange_rtt_s": spread(rtts),
        "tracker": {
            "announces": dict(peer.tracker_counts),
            "rtt_s": spread([s for _, s in peer.tracker_rtts]),
            "rtts": [list(x) for x in peer.tracker_rtts],
        },
    }


def neighbour_totals(records: Sequence[Mapping[str, Any]], book: NeighbourCounts) -> dict[str, Any]:
    """Candidates skipped by reason and dials over the rounds of ``records``, and the book now.

    ``candidates_skipped``: per reason (``backed_off``, ``no_key``, ``not_allowed``,
    ``bad_address``, ``low_trust``), summed over rounds (a peer skipped in 5 rounds counts 5);
    ``bytes_saved``: the rounds' estimates of what skipping low-trust members saved
    (``node.skipping``); ``heard_distinct``, ``known`` and ``backed_off``: ``book`` (see
    :class:`NeighbourCounts`).
    """
    skipped: Counter[str] = Counter()
    dialled = replaced = saved = 0
    for record in records:
        saved += int(record.get("bytes_saved") or 0)
        part = record.get("neighbours")
        if not isinstance(part, dict):
            continue
        skipped.update({str(k): int(v) for k, v in (part.get("skipped") or {}).items()})
        dialled += int(part.get("dialled") or 0)
        replaced += int(part.get("replaced") or 0)
    return {
        "candidates_skipped": dict(skipped),
        "skipped": sum(skipped.values()),
        "dialled": dialled,
        "replaced": replaced,
        "bytes_saved": saved,
        "heard_distinct": book.heard,
        "known": book.known,
        "backed_off": book.backed_off,
    }


def weight_given(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per peer: the mean mixing weight it got over the rounds it was in the cohort.

    A cohort member not mixed that round (rejected, missing) counts as weight 0. Rounds of rules
    without weights (median, trimmed mean, Krum) are left out; empty when there are none.
    """
    totals: dict[str, list[float]] = {}
    for record in records:
        weights = record.get("trust_weights")
        if not isinstance(weights, dict):
            continue
        for peer in record.get("cohort") or []:
            value = weights.get(peer, 0.0)
            totals.setdefault(str(peer), []).append(float(value) if value is not None else 0.0)
    return {peer: sum(values) / len(values) for peer, values in totals.items()}


def weights_by_peer(weights: torch.Tensor | None, heard: Sequence[str]) -> dict[str, float] | None:
    """A round's mixing weights by peer (``self`` first); None for rules without weights."""
    if weights is None:
        return None
    values = weights.tolist()
    return {"self": values[0], **dict(zip(heard, values[1:], strict=True))}


def spread(values: Sequence[float]) -> dict[str, float | int | None]:
    """Count, mean, median and max of ``values`` (seconds); None entries when empty."""
    if not values:
        return {"count": 0, "mean": None, "p50": None, "max": None}
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "mean": sum(ordered) / len(ordered),
        "p50": ordered[len(ordered) // 2],
        "max": ordered[-1],
    }
