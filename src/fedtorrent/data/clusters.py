"""Clustered splits: groups of nodes whose data differ by a fixed transformation per group.

With ``split="label_swap"`` or ``"rotated"`` and ``clusters=K`` (:class:`~fedtorrent.config.
DataConfig`), node ``i`` is in cluster ``i mod K`` (so clusters differ in size by at most one
node, and a node's cluster follows from its index alone). The examples are dealt as ``iid``
(:func:`fedtorrent.data.partition.node_indices`); each cluster then transforms its nodes'
examples:

- ``label_swap``: cluster ``c`` relabels every example ``y -> permutation[c][y]``; cluster 0
  keeps the labels (the identity), the others draw distinct random permutations seeded by the
  data seed, so the same settings give the same permutations on every machine;
- ``rotated``: cluster ``c`` turns every image by ``c * 360 / K`` degrees counter-clockwise
  about its centre: exactly (``np.rot90``) for multiples of 90 degrees on square images, else
  by nearest-neighbour sampling, with pixels that come from outside the image set to 0.

A node's own-distribution test set is the test set under its cluster's transformation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedtorrent.config import CLUSTERED_SPLITS, DataConfig
from fedtorrent.errors import ConfigError

if TYPE_CHECKING:
    from fedtorrent.data.datasets import Dataset
    from fedtorrent.data.partition import NodeSplit

TASK_CLUSTERS = (
    "clustered splits (label_swap, rotated) transform a built-in dataset; a task's "
    "data(node, num_nodes) makes its own split"
)
"""The one-line refusal of a clustered split for a user's task (``simulate``, ``create``)."""
_PERMUTATION_STREAM = 0x6C61_6265
"""Mixed into the data seed for the permutations, so they do not reuse the split's draws."""


@dataclass(frozen=True, eq=False)  # arrays: compare by identity
class Clusters:
    """Which cluster each node is in, and each cluster's transformation.

    Attributes:
        split: ``label_swap`` or ``rotated``.
        assignment: ``(N,)`` int64, node i's cluster (``i mod K``).
        permutations: ``(K, C)`` int64, cluster c's relabelling (identity rows for ``rotated``).
    """

    split: str
    assignment: np.ndarray
    permutations: np.ndarray

    @property
    def num_clusters(self) -> int:
        """K."""
        return int(self.permutations.shape[0])

    def members(self, cluster: int) -> np.ndarray:
        """The nodes of ``cluster``, ascending."""
        return np.flatnonzero(self.assignment == cluster)

    def degrees(self, cluster: int) -> float:
        """How far ``cluster`` rotates its images (0 for ``label_swap``)."""
        return cluster * 360.0 / self.num_clusters if self.split == "rotated" else 0.0

    def transform(
        self, cluster: int, x: np.ndarray, y: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Examples ``(x, y)`` as ``cluster`` sees them; the part left as it is is not copied."""
        if self.split == "label_swap":
            return x, self._relabel(cluster, y)
        return rotate_images(x, self.degrees(cluster)), y

    def transform_nodes(
        self, x: np.ndarray, y: np.ndarray, parts: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The whole arrays with node i's rows ``parts[i]`` (disjoint) as its cluster sees them.

        Rows no node holds stay as they are. Only what changes is copied: the labels (int64) for
        ``label_swap``, the images (float32) for ``rotated``.
        """
        x_out = x if self.split == "label_swap" else np.array(x, dtype=np.float32)
        y_out = np.array(y, dtype=np.int64)
        for cluster in range(1, self.num_clusters):  # cluster 0 is the identity
            rows = [parts[node] for node in self.members(cluster) if node < len(parts)]
            if not rows:
                continue
            index = np.concatenate(rows)
            if self.split == "label_swap":
                y_out[index] = self._relabel(cluster, y_out[index])
            else:
                x_out[index] = rotate_images(x_out[index], self.degrees(cluster))
        return x_out, y_out

    def _relabel(self, cluster: int, y: np.ndarray) -> np.ndarray:
        relabelled: np.ndarray = self.permutations[cluster][np.asarray(y, dtype=np.int64)]
        return relabelled

    def same_cluster(self) -> np.ndarray:
        """``(N, N)`` bool: True where node i and node j are in the same cluster."""
        same: np.ndarray = self.assignment[:, None] == self.assignment[None, :]
        return same


Examples = tuple[np.ndarray, np.ndarray]
"""Inputs and int64 labels."""


def node_examples(
    dataset: Dataset, split: NodeSplit, *, config: DataConfig, node: int
) -> tuple[Examples, Examples, Examples]:
    """Node ``node``'s train, validation and test examples, as a peer and a task hold them.

    ``split`` is the node's part of :func:`~fedtorrent.data.partition.split_nodes` for
    ``config``; the test set is the whole one. With a clustered split all three are under the
    node's cluster's transformation (the test set becomes its own-distribution test set).
    Inputs are the dataset's rows (memory-mapped test inputs are not copied unless rotated).
    """
    parts = [
        (dataset.x_train[split.train], dataset.y_train[split.train]),
        (dataset.x_train[split.val], dataset.y_train[split.val]),
        (dataset.x_test, dataset.y_test),
    ]
    clusters = clusters_for(config, num_classes=dataset.num_classes)
    if clusters is not None:
        cluster = int(clusters.assignment[node])
        parts = [clusters.transform(cluster, x, y) for x, y in parts]
    train, val, test = ((np.asarray(x), np.asarray(y, dtype=np.int64)) for x, y in parts)
    return train, val, test


def clusters_for(config: DataConfig, *, num_classes: int) -> Clusters | None:
    """The clusters of ``config``'s split; None when the split is not clustered.

    Raises:
        ConfigError: more ``label_swap`` clusters than there are permutations of the classes.
    """
    if config.split not in CLUSTERED_SPLITS:
        return None
    k = config.clusters
    assignment = np.arange(config.num_nodes, dtype=np.int64) % k
    identity = np.arange(num_classes, dtype=np.int64)
    if config.split == "rotated":
        return Clusters(config.split, assignment, np.tile(identity, (k, 1)))
    if k > math.factorial(num_classes):
        raise ConfigError(
            f"label_swap with {num_classes} classes has {math.factorial(num_classes)} "
            f"permutations, fewer than clusters={k}"
        )
    return Clusters(config.split, assignment, label_permutations(num_classes, k, seed=config.seed))


def label_permutations(num_classes: int, clusters: int, *, seed: int) -> np.ndarray:
    """``(clusters, num_classes)`` distinct permutations, row 0 the identity, the rest seeded."""
    rng = np.random.default_rng([seed, _PERMUTATION_STREAM])
    rows = [np.arange(num_classes, dtype=np.int64)]
    seen = {rows[0].tobytes()}
    while len(rows) < clusters:
        candidate = rng.permutation(num_classes).astype(np.int64)
        if candidate.tobytes() not in seen:
            seen.add(candidate.tobytes())
            rows.append(candidate)
    return np.stack(rows)


def rotate_images(x: np.ndarray, degrees: float) -> np.ndarray:
    """Every image of ``x`` ``(N, C, H, W)`` turned ``degrees`` counter-clockwise (a new array).

    Multiples of 90 degrees on square images are exact (``np.rot90``); any other angle samples
    the nearest source pixel of each output pixel, and output pixels whose source lies outside
    the image are 0.

    Raises:
        ConfigError: ``x`` is not a batch of images ``(N, C, H, W)``.
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise ConfigError(
            f"split rotated needs images (N, C, H, W), got examples of shape {x.shape[1:]}"
        )
    height, width = x.shape[2:]
    turns = degrees / 90.0
    if turns == round(turns) and height == width:
        return np.ascontiguousarray(np.rot90(x, k=round(turns) % 4, axes=(2, 3)))
    return _rotate_nearest(x, degrees)


def _rotate_nearest(x: np.ndarray, degrees: float) -> np.ndarray:
    """Nearest-neighbour rotation, with the same sense as ``np.rot90`` over axes (2, 3).

    In coordinates centred on the image (row down, column right), output pixel ``(r, c)``
    takes the source pixel ``(cos t * r + sin t * c, -sin t * r + cos t * c)``; at 90 degrees
    this is ``np.rot90``'s ``out[i, j] = in[j, W - 1 - i]``.
    """
    height, width = x.shape[2:]
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    mid_r, mid_c = (height - 1) / 2, (width - 1) / 2
    r, c = np.mgrid[0:height, 0:width]
    r, c = r - mid_r, c - mid_c
    src_r = np.rint(cos * r + sin * c + mid_r).astype(np.int64)
    src_c = np.rint(-sin * r + cos * c + mid_c).astype(np.int64)
    inside = (src_r >= 0) & (src_r < height) & (src_c >= 0) & (src_c < width)
    out = np.zeros(x.shape, dtype=x.dtype)
    out[:, :, inside] = x[:, :, src_r[inside], src_c[inside]]
    return out
