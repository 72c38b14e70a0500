"""Who mixes with whom: graphs as ``(N, N)`` bool adjacency matrices, fixed or fresh each round.

Row i of an adjacency matrix marks the peers whose parameters node i mixes in; the diagonal is
always False (the node itself is added by the mixing step). Every graph is drawn from an explicit
``torch.Generator``, so a seed fixes it.
"""

from __future__ import annotations

import torch

from fedtorrent.config import TOPOLOGIES, TopologyConfig
from fedtorrent.errors import ConfigError, UnknownNameError

Tensor = torch.Tensor


def complete_graph(num_nodes: int) -> Tensor:
    """Everyone mixes with everyone."""
    return ~torch.eye(num_nodes, dtype=torch.bool)


def ring_graph(num_nodes: int) -> Tensor:
    """Node i mixes with i - 1 and i + 1 (mod N)."""
    adjacency = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    if num_nodes > 1:
        index = torch.arange(num_nodes)
        adjacency[index, (index + 1) % num_nodes] = True
        adjacency[index, (index - 1) % num_nodes] = True
    return adjacency


def erdos_renyi_graph(num_nodes: int, edge_prob: float, *, generator: torch.Generator) -> Tensor:
    """Undirected G(N, p): each pair is linked with probability ``edge_prob``."""
    coins = torch.rand(num_nodes, num_nodes, generator=generator) < edge_prob
    upper = torch.triu(coins, diagonal=1)
    return upper | upper.T


def random_regular_graph(num_nodes: int, degree: int, *, generator: torch.Generator) -> Tensor:
    """An undirected simple graph where every node has exactly ``degree`` neighbours.

    Pairs up ``degree`` stubs per node at random and retries on self-loops and repeated edges
    (Steger and Wormald's procedure: near-uniform and fast for small degrees).
    """
    if degree >= num_nodes or (num_nodes * degree) % 2:
        raise ConfigError(
            f"no {degree}-regular graph on {num_nodes} nodes: need degree < nodes and "
            "nodes * degree even"
        )
    for _ in range(100):
        adjacency = _try_regular(num_nodes, degree, generator)
        if adjacency is not None:
            return adjacency
    raise ConfigError(f"could not draw a {degree}-regular graph on {num_nodes} nodes")


def _try_regular(num_nodes: int, degree: int, generator: torch.Generator) -> Tensor | None:
    edges: set[tuple[int, int]] = set()
    stubs = torch.arange(num_nodes).repeat_interleave(degree).tolist()
    while stubs:
        order = torch.randperm(len(stubs), generator=generator).tolist()
        shuffled = [stubs[i] for i in order]
        leftover: list[int] = []
        for a, b in zip(shuffled[0::2], shuffled[1::2], strict=True):
            edge = (min(a, b), max(a, b))
            if a == b or edge in edges:
                leftover += [a, b]
            else:
                edges.add(edge)
        if len(leftover) == len(stubs):
            open_nodes = sorted(set(leftover))
            if not any(
                (a, b) not in edges for i, a in enumerate(open_nodes) for b in open_nodes[i + 1 :]
            ):
                return None  # no legal pair left: start over
        stubs = leftover
    adjacency = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    if edges:
        pairs = torch.tensor(sorted(edges))
        adjacency[pairs[:, 0], pairs[:, 1]] = True
        adjacency[pairs[:, 1], pairs[:, 0]] = True
    return adjacency


def random_cohorts(num_nodes: int, size: int, *, generator: torch.Generator) -> Tensor:
    """Each node draws ``size`` distinct other nodes (what a tracker hands out); directed.

    ``size`` is capped at ``N - 1``.
    """
    size = min(size, num_nodes - 1)
    adjacency = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    if size <= 0:
        return adjacency
    keys = torch.rand(num_nodes, num_nodes, generator=generator)
    keys.fill_diagonal_(2.0)  # never pick yourself
    chosen = keys.topk(size, dim=1, largest=False).indices
    adjacency.scatter_(1, chosen, True)
    return adjacency


class Topology:
    """The cohorts of every round for one run, reproducible from ``seed``.

    Fixed graphs (complete, ring, regular, Erdos-Renyi) are drawn once; ``random_cohort`` draws
    fresh cohorts each round from a generator seeded by ``(seed, round)``, so any round can be
    reproduced on its own.
    """

    def __init__(self, config: TopologyConfig, *, num_nodes: int, seed: int) -> None:
        if config.kind not in TOPOLOGIES:
            raise UnknownNameError("topology", config.kind, TOPOLOGIES)
        self.config = config
        self.num_nodes = num_nodes
        self.seed = seed
        self._fixed: Tensor | None = None
        generator = torch.Generator().manual_seed(seed)
        if config.kind == "complete":
            self._fixed = complete_graph(num_nodes)
        elif config.kind == "ring":
            self._fixed = ring_graph(num_nodes)
        elif config.kind == "regular":
            self._fixed = random_regular_graph(num_nodes, config.degree, generator=generator)
        elif config.kind == "erdos_renyi":
            self._fixed = erdos_renyi_graph(num_nodes, config.edge_prob, generator=generator)

    @property
    def changes_each_round(self) -> bool:
        """Whether cohorts differ between rounds."""
        return self._fixed is None

    def cohorts(self, round_index: int) -> Tensor:
        """``(N, N)`` bool adjacency for ``round_index`` (0-based); no self loops."""
        if self._fixed is not None:
            return self._fixed
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + round_index)
        return random_cohorts(self.num_nodes, self.config.degree, generator=generator)
