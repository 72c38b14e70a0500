"""Split a training set across nodes: seeded, returning index arrays, never copies of the data.

Four schemes (names as in :data:`fedtorrent.config.SPLITS`; the clustered ones, ``label_swap``
and ``rotated``, deal like ``iid`` and then transform each cluster's examples, see
:mod:`fedtorrent.data.clusters`):

- ``iid``: equal sizes, every node with the global label mix (stratified dealing).
- ``noniid``: equal sizes, node ``i``'s label mix drawn from Dirichlet(``alpha``); small ``alpha``
  means few dominant labels per node.
- ``shards``: equal sizes, each node holds exactly ``classes_per_node`` classes in equal amounts.
- ``unbalanced``: the global label mix everywhere, sizes drawn from Dirichlet(``alpha``)
  proportions on top of a floor of ``min_per_node``.

Every index is used at most once and every node gets at least one example. ``iid``, ``noniid``
and ``unbalanced`` use every index exactly once; when N is not a multiple of the node count, the
balanced schemes give the first ``N mod num_nodes`` nodes one example more. ``shards`` keeps sizes
exactly equal by leaving examples unused where the class counts do not divide evenly (see
:func:`node_indices`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedtorrent.config import CLUSTERED_SPLITS, SPLITS, DataConfig
from fedtorrent.errors import ConfigError, UnknownNameError

_SINKHORN_ITERATIONS = 1000
_SINKHORN_TOLERANCE = 1e-6
_DIRICHLET_FLOOR = 1e-12
"""Added to every Dirichlet draw so that scaling never divides by an exact zero."""


@dataclass(frozen=True, eq=False)  # field-wise == on arrays would raise; compare by identity
class NodeSplit:
    """One node's share of the training set: sorted int64 indices into it, disjoint."""

    train: np.ndarray
    val: np.ndarray


def node_indices(
    labels: np.ndarray,
    *,
    num_nodes: int,
    scheme: str,
    alpha: float = 0.5,
    classes_per_node: int = 2,
    min_per_node: int = 10,
    seed: int = 0,
) -> list[np.ndarray]:
    """Partition ``range(len(labels))`` into ``num_nodes`` disjoint, sorted int64 index arrays.

    ``iid`` deals the class-sorted (shuffled within class) indices evenly, so each node's count of
    every class is within a few examples of its size times the global class share. ``noniid`` draws
    a label mix per node from Dirichlet(``alpha``) and scales it (Sinkhorn) to the count matrix with
    equal node sizes and the real class counts that stays closest to those draws, then rounds it.
    ``shards`` gives each node ``classes_per_node`` different classes with ``q`` examples of each,
    where ``q`` is the largest amount for which that many shards exist; the remaining examples stay
    unused (none when classes are equal in size and ``num_nodes * classes_per_node`` is a multiple
    of the class count). ``unbalanced`` draws sizes ``min_per_node + Dirichlet(alpha) * rest`` and
    deals stratified like ``iid``.

    Args:
        labels: 1-D non-negative integer class labels of the training set.
        num_nodes: how many parts.
        scheme: one of ``iid``, ``noniid``, ``shards``, ``unbalanced`` (or a clustered split,
            dealt as ``iid``).
        alpha: Dirichlet concentration (label skew for ``noniid``, size skew for ``unbalanced``).
        classes_per_node: classes per node for ``shards``.
        min_per_node: smallest node for ``unbalanced``.
        seed: the same seed and arguments give the same partition.

    Raises:
        UnknownNameError: ``scheme`` is not a split name.
        ConfigError: bad labels, ``alpha <= 0``, more nodes than examples, ``min_per_node *
            num_nodes > len(labels)``, or more classes per node than the labels hold.
    """
    classes, labels = _compact_labels(labels)
    total = len(labels)
    if scheme not in SPLITS:
        raise UnknownNameError("split", scheme, SPLITS)
    _check(num_nodes >= 1, f"num_nodes must be >= 1, got {num_nodes}")
    _check(alpha > 0 and math.isfinite(alpha), f"alpha must be a finite number > 0, got {alpha}")
    _check(seed >= 0, f"seed must be >= 0, got {seed}")
    _check(
        num_nodes <= total,
        f"cannot split {total} examples across {num_nodes} nodes: more nodes than examples",
    )
    rng = np.random.default_rng(seed)
    class_counts = np.bincount(labels, minlength=len(classes))
    if scheme == "iid" or scheme in CLUSTERED_SPLITS:
        parts = _deal_stratified(labels, _equal_sizes(total, num_nodes), rng)
    elif scheme == "unbalanced":
        sizes = _dirichlet_sizes(total, num_nodes, alpha=alpha, min_per_node=min_per_node, rng=rng)
        parts = _deal_stratified(labels, sizes, rng)
    elif scheme == "noniid":
        mix = rng.dirichlet(np.full(len(classes), alpha), size=num_nodes) + _DIRICHLET_FLOOR
        sizes = _equal_sizes(total, num_nodes)
        counts = _round_matrix(_sinkhorn(mix, sizes, class_counts), sizes, class_counts)
        parts = _deal_counts(labels, counts, rng)
    else:
        counts = _shard_counts(class_counts, num_nodes, classes_per_node=classes_per_node, rng=rng)
        parts = _deal_counts(labels, counts, rng)
    return [np.sort(part).astype(np.int64) for part in parts]


def train_val_split(indices: np.ndarray, *, val_fraction: float = 0.2, seed: int = 0) -> NodeSplit:
    """Split one node's indices at random into train and validation parts.

    The validation part holds ``round(len * val_fraction)`` indices (halves round up), but never
    all of them: one training example is always kept when there is one.
    """
    _check(0 <= val_fraction < 1, f"val_fraction must be in [0, 1), got {val_fraction}")
    _check(seed >= 0, f"seed must be >= 0, got {seed}")
    indices = np.asarray(indices)
    _check(indices.ndim == 1, f"indices must be 1-D, got shape {indices.shape}")
    _check(
        indices.size == 0 or np.issubdtype(indices.dtype, np.integer),
        f"indices must be integers, got {indices.dtype}",
    )
    count = len(indices)
    num_val = min(math.floor(count * val_fraction + 0.5), max(count - 1, 0))
    shuffled = np.random.default_rng(seed).permutation(indices.astype(np.int64))
    return NodeSplit(train=np.sort(shuffled[num_val:]), val=np.sort(shuffled[:num_val]))


def split_nodes(labels: np.ndarray, config: DataConfig) -> list[NodeSplit]:
    """Partition by ``config`` and split each node into train and validation parts.

    Node ``i``'s validation draw is seeded from ``(config.seed, i)``, so it does not depend on the
    other nodes.
    """
    parts = node_indices(
        labels,
        num_nodes=config.num_nodes,
        scheme=config.split,
        alpha=config.alpha,
        classes_per_node=config.classes_per_node,
        min_per_node=config.min_per_node,
        seed=config.seed,
    )
    return [
        train_val_split(part, val_fraction=config.val_fraction, seed=_child_seed(config.seed, node))
        for node, part in enumerate(parts)
    ]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _compact_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct labels and each label's position among them (so label values may be sparse)."""
    labels = np.asarray(labels)
    _check(labels.ndim == 1, f"labels must be 1-D, got shape {labels.shape}")
    _check(
        labels.size == 0 or np.issubdtype(labels.dtype, np.integer),
        f"labels must be integers, got {labels.dtype}",
    )
    _check(labels.size == 0 or int(labels.min()) >= 0, "labels must be >= 0")
    classes, compact = np.unique(labels.astype(np.int64), return_inverse=True)
    return classes, compact.reshape(-1)


def _child_seed(seed: int, node: int) -> int:
    return int(np.random.SeedSequence([seed, node]).generate_state(1)[0])


def _equal_sizes(total: int, parts: int) -> np.ndarray:
    sizes = np.full(parts, total // parts, dtype=np.int64)
    sizes[: total % parts] += 1
    return sizes


def _round_to_total(values: np.ndarray, total: int) -> np.ndarray:
    """Largest-remainder rounding: integers within one of ``values`` that sum to ``total``."""
    floors: np.ndarray = np.floor(values).astype(np.int64)
    short = total - int(floors.sum())
    order = np.argsort(-(values - floors), kind="stable")
    floors[order[:short]] += 1
    return floors


def _dirichlet_sizes(
    total: int, parts: int, *, alpha: float, min_per_node: int, rng: np.random.Generator
) -> np.ndarray:
    _check(min_per_node >= 1, f"min_per_node must be >= 1, got {min_per_node}")
    _check(
        min_per_node * parts <= total,
        f"cannot give {parts} nodes at least {min_per_node} examples each: only {total} exist",
    )
    rest = total - min_per_node * parts
    shares = rng.dirichlet(np.full(parts, alpha))
    return min_per_node + _round_to_total(shares * rest, rest)


def _deal_stratified(
    labels: np.ndarray, sizes: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Give node ``i`` ``sizes[i]`` indices spread evenly over the class-sorted order.

    Node ``i`` takes the slots ranked by the keys ``(j + u_i) / sizes[i]``, so in any stretch of the
    sorted order (one class) it owns about its share of the slots: the label mix matches the global
    one within a few examples, whatever the sizes.
    """
    shuffled = rng.permutation(len(labels))
    by_class = shuffled[np.argsort(labels[shuffled], kind="stable")]
    keys = np.concatenate([(np.arange(size) + rng.random()) / size for size in sizes])
    owners = np.repeat(np.arange(len(sizes)), sizes)[np.argsort(keys, kind="stable")]
    grouped = by_class[np.argsort(owners, kind="stable")]
    return np.split(grouped, np.cumsum(sizes)[:-1])


def _sinkhorn(weights: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Scale rows and columns of a positive matrix until its sums are ``rows`` and ``cols``.

    The result is the matrix with those sums closest to ``weights`` in KL divergence; the column
    sums are exact, the row sums within a small tolerance (rounding fixes the rest).
    """
    matrix = weights.astype(np.float64)
    for _ in range(_SINKHORN_ITERATIONS):
        matrix *= (rows / matrix.sum(axis=1))[:, None]
        matrix *= (cols / matrix.sum(axis=0))[None, :]
        if np.abs(matrix.sum(axis=1) - rows).max() < _SINKHORN_TOLERANCE:
            break
    return matrix


def _round_matrix(matrix: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Round a non-negative matrix to integers with row sums ``rows`` and column sums ``cols``.

    Floors every cell, then hands out the missing units to the cells with the largest fractional
    parts whose row and column still lack some; any units left go to the first open cells.
    """
    counts: np.ndarray = np.floor(matrix).astype(np.int64)
    row_short = np.maximum(rows - counts.sum(axis=1), 0)
    col_short = np.maximum(cols - counts.sum(axis=0), 0)
    num_cols = matrix.shape[1]
    for flat in np.argsort(-(matrix - counts), axis=None, kind="stable"):
        row, col = divmod(int(flat), num_cols)
        if row_short[row] > 0 and col_short[col] > 0:
            counts[row, col] += 1
            row_short[row] -= 1
            col_short[col] -= 1
    for row in np.flatnonzero(row_short):
        for col in np.flatnonzero(col_short):
            take = min(row_short[row], col_short[col])
            counts[row, col] += take
            row_short[row] -= take
            col_short[col] -= take
    return counts


def _shard_counts(
    class_counts: np.ndarray, parts: int, *, classes_per_node: int, rng: np.random.Generator
) -> np.ndarray:
    """Node-by-class counts: each node ``classes_per_node`` distinct classes, ``q`` of each.

    A class can hold at most ``parts`` shards (one per node), so ``parts * classes_per_node``
    shards of size ``q`` exist iff ``sum(min(count // q, parts)) >= parts * classes_per_node``;
    ``q`` is the largest such size. Shards are taken one per class in a random class order, then a
    second per class, and so on, so classes spread as evenly as their counts allow. Dealing the
    class-grouped shards round-robin gives every node different classes, as no class has more than
    ``parts``.
    """
    num_classes = len(class_counts)
    needed = parts * classes_per_node
    _check(classes_per_node >= 1, f"classes_per_node must be >= 1, got {classes_per_node}")
    _check(
        classes_per_node <= num_classes,
        f"classes_per_node={classes_per_node} exceeds the {num_classes} classes in the labels",
    )

    def enough(size: int) -> bool:
        return int(np.minimum(class_counts // size, parts).sum()) >= needed

    _check(
        enough(1),
        f"cannot give {parts} nodes {classes_per_node} different classes each from "
        f"{int(class_counts.sum())} examples",
    )
    low, high = 1, int(class_counts.max())
    while low < high:  # largest shard size that still yields enough shards
        mid = (low + high + 1) // 2
        low, high = (mid, high) if enough(mid) else (low, mid - 1)
    available = np.minimum(class_counts // low, parts)
    order = rng.permutation(num_classes)
    tokens = [int(c) for level in range(parts) for c in order if available[c] > level][:needed]
    taken = np.bincount(tokens, minlength=num_classes)
    grouped = np.repeat(order, taken[order])
    counts = np.zeros((parts, num_classes), dtype=np.int64)
    np.add.at(counts, (np.arange(needed) % parts, grouped), low)
    return counts[rng.permutation(parts)]


def _deal_counts(
    labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Give node ``i`` ``counts[i, c]`` random examples of class ``c``, without reuse."""
    parts: list[list[np.ndarray]] = [[] for _ in range(counts.shape[0])]
    for cls in range(counts.shape[1]):
        members = rng.permutation(np.flatnonzero(labels == cls))
        bounds = np.cumsum(counts[:, cls])
        for node, chunk in enumerate(np.split(members[: bounds[-1]], bounds[:-1])):
            parts[node].append(chunk)
    return [np.concatenate(chunks) for chunks in parts]
