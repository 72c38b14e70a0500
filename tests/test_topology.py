"""Topologies: shapes, degrees, symmetry, no self loops, and seeds that fix them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtorrent.config import TopologyConfig
from fedtorrent.errors import ConfigError
from fedtorrent.sim.topology import (
    Topology,
    complete_graph,
    erdos_renyi_graph,
    random_cohorts,
    random_regular_graph,
    ring_graph,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _no_self_loops(adjacency: torch.Tensor) -> bool:
    return not bool(adjacency.diagonal().any())


def test_complete_and_ring() -> None:
    complete = complete_graph(5)
    assert _no_self_loops(complete) and int(complete.sum()) == 20
    ring = ring_graph(6)
    assert _no_self_loops(ring) and torch.equal(ring, ring.T)
    assert ring.sum(dim=1).tolist() == [2] * 6
    assert bool(ring[0, 5]) and bool(ring[0, 1]) and not bool(ring[0, 3])
    assert int(ring_graph(1).sum()) == 0


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 40), degree=st.integers(1, 6), seed=st.integers(0, 1000))
def test_random_regular_graph_is_simple_and_regular(n: int, degree: int, seed: int) -> None:
    if degree >= n or (n * degree) % 2:
        with pytest.raises(ConfigError):
            random_regular_graph(n, degree, generator=_gen(seed))
        return
    graph = random_regular_graph(n, degree, generator=_gen(seed))
    assert _no_self_loops(graph)
    assert torch.equal(graph, graph.T)
    assert graph.sum(dim=1).tolist() == [degree] * n


def test_erdos_renyi_is_undirected_and_seeded() -> None:
    graph = erdos_renyi_graph(30, 0.3, generator=_gen(1))
    assert torch.equal(graph, graph.T) and _no_self_loops(graph)
    assert 0.15 < float(graph.sum()) / (30 * 29) < 0.45
    assert torch.equal(graph, erdos_renyi_graph(30, 0.3, generator=_gen(1)))
    assert torch.equal(erdos_renyi_graph(7, 1.0, generator=_gen(0)), complete_graph(7))


def test_random_cohorts_have_k_distinct_others() -> None:
    cohorts = random_cohorts(50, 4, generator=_gen(3))
    assert cohorts.sum(dim=1).tolist() == [4] * 50
    assert _no_self_loops(cohorts)
    assert random_cohorts(3, 10, generator=_gen(0)).sum(dim=1).tolist() == [2, 2, 2]
    assert int(random_cohorts(1, 3, generator=_gen(0)).sum()) == 0


def test_topology_redraws_cohorts_each_round_reproducibly() -> None:
    topology = Topology(TopologyConfig(kind="random_cohort", degree=3), num_nodes=20, seed=5)
    assert topology.changes_each_round
    first, second = topology.cohorts(0), topology.cohorts(1)
    assert not torch.equal(first, second)
    again = Topology(TopologyConfig(kind="random_cohort", degree=3), num_nodes=20, seed=5)
    assert torch.equal(again.cohorts(1), second)
    other = Topology(TopologyConfig(kind="random_cohort", degree=3), num_nodes=20, seed=6)
    assert not torch.equal(other.cohorts(0), first)


@pytest.mark.parametrize("kind", ["complete", "ring", "regular", "erdos_renyi"])
def test_fixed_topologies_do_not_change(kind: str) -> None:
    topology = Topology(TopologyConfig(kind=kind, degree=2), num_nodes=8, seed=0)
    assert not topology.changes_each_round
    assert torch.equal(topology.cohorts(0), topology.cohorts(7))
    assert _no_self_loops(topology.cohorts(0))


def test_bad_topology_settings_fail_early() -> None:
    with pytest.raises(ConfigError):
        TopologyConfig(kind="star")
    with pytest.raises(ConfigError):
        Topology(TopologyConfig(kind="regular", degree=3), num_nodes=5, seed=0)
