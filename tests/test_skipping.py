"""Trust-aware fetching: which cohort members a peer leaves undownloaded (``node.skipping``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from fedtorrent.config import MixingConfig
from fedtorrent.errors import ConfigError
from fedtorrent.node.skipping import LowTrustSkipper


@dataclass(frozen=True)
class M:
    peer_id: str


def mixed_round(skipper: LowTrustSkipper, weights: dict[str, float], *, size: int = 100) -> None:
    """A round in which every peer of ``weights`` was fetched (a payload of ``size``) and mixed."""
    heard = list(weights)
    rest = 1.0 - sum(weights.values())
    skipper.record(
        skipped=[],
        heard=heard,
        weights=[rest, *weights.values()],
        payload_bytes=dict.fromkeys(heard, size),
    )


def run_round(
    skipper: LowTrustSkipper, cohort: list[str], weights: dict[str, float]
) -> tuple[list[str], int]:
    """Plan, fetch and mix the members kept with ``weights``; returns (skipped, bytes saved)."""
    plan = skipper.plan([M(p) for p in cohort], [])
    heard = [m.peer_id for m in plan.cohort]
    skipper.record(
        skipped=plan.skipped,
        heard=heard,
        weights=[0.5, *(weights[p] for p in heard)],
        payload_bytes=dict.fromkeys(heard, 100),
    )
    return plan.skipped, plan.bytes_saved


def test_a_member_below_the_threshold_for_r_mixed_rounds_is_skipped() -> None:
    skipper = LowTrustSkipper(below=0.05, after=3)
    for _ in range(2):
        mixed_round(skipper, {"bad": 0.01, "good": 0.4})
    assert not skipper.skips("bad")  # two low rounds of three
    mixed_round(skipper, {"bad": 0.01, "good": 0.4}, size=123)
    assert skipper.skips("bad") and not skipper.skips("good")
    plan = skipper.plan([M("bad"), M("good")], [M("spare")])
    assert [m.peer_id for m in plan.cohort] == ["good"]
    assert [m.peer_id for m in plan.reserve] == ["spare"]  # the slot is not refilled
    assert plan.skipped == ["bad"] and plan.bytes_saved == 123  # its last payload


def test_a_round_at_or_above_the_threshold_resets_the_count() -> None:
    skipper = LowTrustSkipper(below=0.05, after=2)
    mixed_round(skipper, {"p": 0.01})
    mixed_round(skipper, {"p": 0.05})  # not below
    mixed_round(skipper, {"p": 0.01})
    assert not skipper.skips("p")
    mixed_round(skipper, {"p": 0.01})
    assert skipper.skips("p")


def test_rounds_fetched_but_not_mixed_do_not_count() -> None:
    skipper = LowTrustSkipper(below=0.05, after=2)
    mixed_round(skipper, {"p": 0.01})
    skipper.record(skipped=[], heard=[], weights=[1.0], payload_bytes={"p": 7})  # screened out
    skipper.record(skipped=[], heard=["p"], weights=None, payload_bytes={})  # no weights
    assert not skipper.skips("p")
    mixed_round(skipper, {"p": 0.01})
    assert skipper.skips("p")


def test_a_skipped_member_is_probed_after_r_skipped_rounds_and_can_come_back() -> None:
    skipper = LowTrustSkipper(below=0.1, after=2)
    low = {"bad": 0.01, "ok": 0.4}
    for _ in range(2):
        mixed_round(skipper, low)
    fetched = []
    for _ in range(6):
        skipped, saved = run_round(skipper, ["bad", "ok"], low)
        fetched.append("bad" not in skipped)
        assert saved == (0 if "bad" not in skipped else 100)
    assert fetched == [False, False, True, False, False, True]  # skip R, probe, skip R, probe
    run_round(skipper, ["bad", "ok"], low)
    run_round(skipper, ["bad", "ok"], low)
    skipped, _ = run_round(skipper, ["bad", "ok"], {"bad": 0.3, "ok": 0.3})  # the probe: better
    assert skipped == []
    assert [run_round(skipper, ["bad", "ok"], low)[0] for _ in range(2)] == [[], []]


def test_a_probe_that_brings_nothing_is_retried_next_round() -> None:
    skipper = LowTrustSkipper(below=0.1, after=1)
    mixed_round(skipper, {"bad": 0.0})
    assert run_round(skipper, ["bad"], {})[0] == ["bad"]
    skipper.record(skipped=[], heard=[], weights=[1.0], payload_bytes={})  # probe timed out
    assert not skipper.skips("bad")


def test_when_every_member_is_skipped_one_reserve_peer_takes_a_slot() -> None:
    skipper = LowTrustSkipper(below=0.1, after=1)
    mixed_round(skipper, {"a": 0.01, "b": 0.01, "c": 0.01})
    plan = skipper.plan([M("a"), M("b")], [M("c"), M("d"), M("e")])
    assert [m.peer_id for m in plan.cohort] == ["d"]  # c is low as well: never a stand-in
    assert [m.peer_id for m in plan.reserve] == ["e"]
    assert plan.skipped == ["a", "b"] and plan.bytes_saved == 200
    alone = skipper.plan([M("a")], [M("c")])
    assert alone.cohort == [] and alone.skipped == ["a"]  # nobody else: the peer mixes alone
    assert [m.peer_id for m in skipper.keep([M("a"), M("d")])] == ["d"]


def test_skipping_is_off_by_default_and_never_with_other_rules() -> None:
    default = LowTrustSkipper.from_mixing(MixingConfig())
    assert MixingConfig().skip_below == 0.0 and MixingConfig().skip_after == 3
    assert not default.enabled
    for _ in range(5):
        mixed_round(default, {"p": 0.0})
    assert not default.skips("p")
    assert default.plan([M("p")], []).skipped == []
    on = LowTrustSkipper.from_mixing(MixingConfig(skip_below=0.05, skip_after=1))
    assert on.enabled and (on.below, on.after) == (0.05, 1)
    for rule in ("fixed", "median", "krum", "none"):
        assert not LowTrustSkipper.from_mixing(MixingConfig(rule=rule)).enabled
        with pytest.raises(ConfigError, match="skip_below needs the learned"):
            MixingConfig(rule=rule, skip_below=0.05)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"skip_below": -0.1}, "skip_below must be in"),
        ({"skip_below": 1.0}, "skip_below must be in"),
        ({"skip_after": 0}, "skip_after must be >= 1"),
        ({"skip_below": 0.05, "weight_floor": 0.05}, "must exceed weight_floor"),
    ],
)
def test_bad_skip_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MixingConfig(**settings)


def test_the_skipper_remembers_a_bounded_number_of_peers() -> None:
    skipper = LowTrustSkipper(below=0.1, after=1, max_entries=2)
    mixed_round(skipper, {"old": 0.0})
    mixed_round(skipper, {"b": 0.0, "c": 0.0})
    assert not skipper.skips("old") and skipper.skips("b") and skipper.skips("c")
