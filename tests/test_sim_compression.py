"""Compression in the simulator: the public copies a peer's sender keeps, and the bytes counted."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fedtorrent as ft
from fedtorrent.config import DataConfig, MixingConfig, SimConfig, TopologyConfig
from fedtorrent.errors import ConfigError
from fedtorrent.sim.traffic import HISTORY, Traffic, request_bytes, state_header_bytes
from fedtorrent.state.compress import Compression, packet_bytes


def test_traffic_counts_updates_since_the_copy_held_and_whole_copies_past_the_history() -> None:
    spec = Compression.parse("topk:0.1,int8")
    traffic = Traffic(num_nodes=3, num_values=1000, full_bytes=4100, compression=spec)
    update = packet_bytes(spec, 1000) + state_header_bytes(codec=str(spec), num_nodes=3)
    request = request_bytes(num_nodes=3, base=True)
    pair = torch.zeros(3, 3, dtype=torch.bool)
    pair[0, 1] = True  # node 0 fetches node 1 only
    traffic.record(pair, 0)  # everyone holds the initial state: one update
    assert int(traffic.received[0]) == update and int(traffic.received[1]) == request
    for r in range(1, 1 + HISTORY + 1):
        traffic.record(torch.zeros(3, 3, dtype=torch.bool), r)  # node 0 misses rounds
    traffic.record(pair, HISTORY + 2)  # further behind than the sender keeps: a whole copy
    whole = 4100 + state_header_bytes(codec=None, num_nodes=3)
    assert int(traffic.received[0]) == update + whole
    assert traffic.full_fetches == 1 and traffic.fetches == 2
    traffic.record(pair, HISTORY + 4)  # two rounds behind: two updates in one reply
    assert int(traffic.received[0]) == update + whole + 2 * packet_bytes(spec, 1000) + (
        update - packet_bytes(spec, 1000)
    )
    plain = Traffic(num_nodes=3, num_values=1000, full_bytes=4100, compression=Compression())
    plain.record(pair, 0)
    assert int(plain.received[0]) == whole and plain.full_fetches == 1


def test_traffic_lists_the_bytes_of_each_round_and_they_sum_to_the_total() -> None:
    spec = Compression.parse("int8")
    traffic = Traffic(num_nodes=3, num_values=1000, full_bytes=4100, compression=spec)
    update = packet_bytes(spec, 1000) + state_header_bytes(codec=str(spec), num_nodes=3)
    request = request_bytes(num_nodes=3, base=True)
    everyone = ~torch.eye(3, dtype=torch.bool)
    traffic.record(everyone, 0)  # six fetches of one update each
    traffic.record(torch.zeros(3, 3, dtype=torch.bool), 1)  # nobody fetches
    traffic.record(everyone, 2)  # two rounds behind: two updates per reply
    summary = traffic.summary(3)
    assert summary["received_per_round"] == [
        6 * (update + request),
        0,
        6 * (update + packet_bytes(spec, 1000) + request),
    ]
    assert sum(summary["received_per_round"]) == summary["p2p_bytes"]


def _run(compression: str) -> dict:
    config = SimConfig(
        data=DataConfig(dataset="digits", num_nodes=4),
        mixing=MixingConfig(rule="fixed"),
        topology=TopologyConfig(kind="complete"),
        rounds=8,
        compression=compression,
    )
    _, summary = ft.simulate(config, progress=False)
    return summary["by_mixing"]["fixed"]


def test_int8_moves_about_a_quarter_of_the_bytes_and_learns_as_well() -> None:
    plain, int8, sparse = _run("none"), _run("int8"), _run("topk:0.1,int8")
    assert plain["traffic"]["compression"] == "none"
    ratio = int8["traffic"]["p2p_bytes"] / plain["traffic"]["p2p_bytes"]
    assert 0.25 < ratio < 0.4  # a quarter of the payload; digits' 650 values make headers count
    assert abs(int8["accuracy_mean"] - plain["accuracy_mean"]) < 0.01
    assert sparse["traffic"]["p2p_bytes"] < sparse["traffic"]["central_server_bytes"]
    assert sparse["accuracy_mean"] > plain["accuracy_mean"] - 0.1  # 8 rounds: the copies lag


def test_a_bad_compression_is_one_config_error() -> None:
    with pytest.raises(ConfigError, match="compression must be one of"):
        _run("int7")
    with pytest.raises(ConfigError, match="compression"):
        ft.simulate(dataclasses.replace(SimConfig(), compression="topk:2"), progress=False)
