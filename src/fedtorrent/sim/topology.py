"""Who mixes with whom: graphs as ``(N, N)`` bool adjacency matrices, fixed or fresh each round.

Row i of an adjacency matrix marks the peers whose parameters node i mixes in; the diagonal is
always False (the node itself is added by the mixing step). Every graph is drawn from an explicit
``torch.Generator``, so a seed fixes it. Trust-guided cohorts (``MixingConfig.trust_cohorts``,
:func:`trust_guided_cohorts`) also read every node's trust logits, so a seed and the run's
trust so far fix them.
"""

from __future__ import annotations

import torch

from fedtorrent.config import TOPOLOGIES, TopologyConfig
from fedtorrent.errors import ConfigError, UnknownNameError
from fedtorrent.mixing.cohort import CANDIDATE_FACTOR, trust_cohort
from fedtorrent.training.seeds import Stream, node_generator

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


def trust_guided_cohorts(
    logits: Tensor,
    seen: Tensor,
    *,
    size: int,
    explore: float,
    seed: int,
    round_index: int,
) -> Tensor:
    """Each node's cohort by :func:`~fedtorrent.mixing.cohort.trust_cohort`; directed.

    Node i draws ``CANDIDATE_FACTOR * size`` other nodes at random (capped at ``N - 1``: what a
    tracker's answer of that many peers holds), then picks ``size`` of them by its trust logits
    ``logits[i]`` over the candidates it has ``seen`` (mixed with before), exploring a share
    ``explore``. Both draws come from node i's ``COHORT`` generator of the round.

    Args:
        logits: ``(N, N)`` trust logits, row i = node i's.
        seen: ``(N, N)`` bool, True where node i mixed node j before.
        size: the cohort size (capped at ``N - 1``).
        explore: the exploration share in ``[0, 1]``.
        seed: the run's seed.
        round_index: 0-based.

    Returns:
        ``(N, N)`` bool adjacency on ``logits``' device, no self loops.
    """
    n = int(logits.shape[0])
    size = min(size, n - 1)
    adjacency = torch.zeros(n, n, dtype=torch.bool, device="cpu")
    if size <= 0:
        return adjacency.to(logits.device)
    pool = min(n - 1, CANDIDATE_FACTOR * size)
    values, known = logits.detach().cpu().tolist(), seen.cpu().tolist()
    for node in range(n):
        generator = node_generator(seed, Stream.COHORT, round_index, node)
        draw = torch.randperm(n - 1, generator=generator, device="cpu")[:pool].tolist()
        candidates = [j + (j >= node) for j in draw]  # every node but this one
        row = [values[node][j] if known[node][j] else None for j in candidates]
        chosen = trust_cohort(row, size=size, explore=explore, generator=generator)
        adjacency[node, [candidates[c] for c in chosen]] = True
    return adjacency.to(logits.device)


class Topology:
    """The cohorts of every round for one run, reproducible from ``seed``.

    Fixed graphs (complete, ring, regular, Erdos-Renyi) are drawn once; ``random_cohort`` draws
    fresh cohorts each round from a generator seeded by ``(seed, round)``, so any round can be
    reproduced on its own. With ``explore`` (trust-guided cohorts, ``MixingConfig.trust_cohorts``)
    a ``random_cohort`` round also needs the engine's trust logits and "seen" mask
    (:func:`trust_guided_cohorts`); the last round drawn is kept, so it can be asked again
    without them (records, traffic).
    """

    def __init__(
        self,
        config: TopologyConfig,
        *,
        num_nodes: int,
        seed: int,
        explore: float | None = None,
    ) -> None:
        if config.kind not in TOPOLOGIES:
            raise UnknownNameError("topology", config.kind, TOPOLOGIES)
        if explore is not None and config.kind != "random_cohort":
            raise ConfigError("trust-guided cohorts need the random_cohort topology")
        self.config = config
        self.num_nodes = num_nodes
        self.seed = seed
        self.explore = explore
        """The exploration share of trust-guided cohorts; None: plain random cohorts."""
        self._drawn: tuple[int, Tensor] | None = None
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

    @property
    def trust_guided(self) -> bool:
        """Whether cohorts are chosen by trust (they then need ``logits`` and ``seen``)."""
        return self.explore is not None

    def cohorts(
        self, round_index: int, *, logits: Tensor | None = None, seen: Tensor | None = None
    ) -> Tensor:
        """``(N, N)`` bool adjacency for ``round_index`` (0-based); no self loops.

        ``logits`` and ``seen`` (see :func:`trust_guided_cohorts`) are read only by trust-guided
        cohorts, which need them for any round but the last one drawn.
        """
        if self._fixed is not None:
            return self._fixed
        if self.explore is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + round_index)
            return random_cohorts(self.num_nodes, self.config.degree, generator=generator)
        if self._drawn is not None and self._drawn[0] == round_index:
            return self._drawn[1]
        if logits is None or seen is None:
            raise ConfigError(f"trust-guided cohorts of round {round_index} need trust logits")
        adjacency = trust_guided_cohorts(
            logits, seen, size=self.config.degree, explore=self.explore, seed=self.seed,
            round_index=round_index,
        )  # fmt: skip
        self._drawn = (round_index, adjacency)
        return adjacency
