"""The peer's side of the tracker: status words, counts, and re-announcing after an outage."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from fedtorrent.errors import ConfigError, TrackerError
from fedtorrent.net.tracker.client import TrackerAnswer
from fedtorrent.node.tracking import TrackerLink

ANSWER = TrackerAnswer(interval=30, complete=0, incomplete=1, peers=(), received_at=0.0)


class Scripted:
    """Answers announces from a script: an answer, a cached answer, or an outage."""

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.events: list[str] = []

    def announce(self, info_hash: str, peer_id: str, *, event: str = "", **_: Any) -> TrackerAnswer:
        self.events.append(event)
        step = self.script.pop(0)
        if step == "down":
            raise TrackerError("connection refused")
        return dataclasses.replace(ANSWER, cached=step == "cached")


def test_outage_and_return() -> None:
    tracker = Scripted(["ok", "cached", "down", "ok", "ok"])
    link = TrackerLink(tracker)
    statuses = [
        link.announce("ab" * 32, "p", event=e, round=r, port=1)[2]
        for r, e in enumerate(["started", "", "", "", ""])
    ]
    assert statuses == ["ok", "cached", "down", "ok", "ok"]
    # Back after the outage: announced as "started", so a tracker that forgot the peer lists it.
    assert tracker.events == ["started", "", "started", "started", ""]
    assert link.counts == {"ok": 3, "cached": 1, "failed": 1, "reconnected": 1}
    assert [r for r, _ in link.rtts] == [0, 3, 4] and link.online is True


def test_no_tracker_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        TrackerLink().announce("ab" * 32, "p", event="started", round=0, port=1)
