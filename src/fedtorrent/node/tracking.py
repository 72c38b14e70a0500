"""A peer's side of the tracker: announces, whether the tracker is up, counts and round trips.

The round loop only needs an answer and a status word; the report reads the counts and round
trips. A peer that lost the tracker re-announces ``started`` when it is back, so the tracker lists
it again even if it forgot the peer meanwhile (a restart, or the peer's entry expired).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from fedtorrent.errors import ConfigError, TrackerError

if TYPE_CHECKING:
    from fedtorrent.net.tracker.client import TrackerAnswer
    from fedtorrent.node.exchange import Announcer

log = logging.getLogger(__name__)

STATUSES = ("ok", "cached", "down")
"""``ok``: the tracker answered; ``cached``: it is down and the last answer is reused; ``down``:
it is down and nothing is cached."""


class TrackerLink:
    """Announces through an ``Announcer`` and keeps what the peer's reports need."""

    def __init__(self, announcer: Announcer | None = None) -> None:
        self.announcer = announcer
        """Set before the first :meth:`announce` (the peer builds its client in ``start``)."""
        self.online: bool | None = None
        """None before the first announce, then whether the last one reached the tracker."""
        self.counts: Counter[str] = Counter()
        """Announces by outcome: ``ok``, ``cached``, ``failed``, ``reconnected``."""
        self.rtts: list[tuple[int, float]] = []
        """(peer's round, seconds) of each announce the tracker answered."""

    def announce(
        self, info_hash: str, peer_id: str, *, event: str, round: int, **fields: Any
    ) -> tuple[TrackerAnswer | None, float | None, str]:
        """Announce; return the answer (None when unreachable), its RTT and a status word.

        ``fields`` are the ``Announcer.announce`` keywords besides ``event`` and ``round``.
        """
        if self.announcer is None:
            raise ConfigError("no tracker to announce to")
        if event == "" and self.online is False:
            event = "started"
        started = time.perf_counter()
        try:
            answer = self.announcer.announce(info_hash, peer_id, event=event, round=round, **fields)
        except TrackerError as exc:
            self.counts["failed"] += 1
            if self.online is not False:
                log.warning("tracker unreachable, no cached peers: %s", exc)
            self.online = False
            return None, None, "down"
        rtt = time.perf_counter() - started
        if answer.cached:
            self.counts["cached"] += 1
            if self.online is not False:
                log.warning("tracker unreachable; training on with the cached cohort")
            self.online = False
            return answer, None, "cached"
        if self.online is False:
            self.counts["reconnected"] += 1
            log.info("tracker is back; re-announced")
        self.online = True
        self.counts["ok"] += 1
        self.rtts.append((round, rtt))
        return answer, rtt, "ok"
