from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtorrent.config import SPLITS, DataConfig
from fedtorrent.data.partition import NodeSplit, node_indices, split_nodes, train_val_split
from fedtorrent.errors import ConfigError, DataError, UnknownNameError


@st.composite
def labelled(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    """Random labels (some classes possibly rare or absent), a node count and a seed."""
    num_classes = draw(st.integers(1, 6))
    total = draw(st.integers(1, 300))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weights = rng.dirichlet(np.ones(num_classes))
    labels = rng.choice(num_classes, size=total, p=weights).astype(np.int64)
    nodes = draw(st.integers(1, min(total, 12)))
    return labels, nodes, draw(st.integers(0, 1000))


def _check_disjoint_sorted(parts: list[np.ndarray], total: int, *, complete: bool) -> None:
    for part in parts:
        assert part.dtype == np.int64 and part.ndim == 1 and len(part) >= 1
        assert np.all(np.diff(part) > 0)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)
    assert joined.min() >= 0 and joined.max() < total
    if complete:
        assert len(joined) == total


def _class_counts(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    num_classes = int(labels.max()) + 1
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


@settings(max_examples=60, deadline=None)
@given(labelled(), st.sampled_from(["iid", "noniid"]), st.floats(0.05, 50))
def test_balanced_splits_use_every_index_once_with_equal_sizes(
    case: tuple[np.ndarray, int, int], scheme: str, alpha: float
) -> None:
    labels, nodes, seed = case
    parts = node_indices(labels, num_nodes=nodes, scheme=scheme, alpha=alpha, seed=seed)
    assert len(parts) == nodes
    _check_disjoint_sorted(parts, len(labels), complete=True)
    sizes = [len(p) for p in parts]
    extra = len(labels) % nodes
    assert sizes == [len(labels) // nodes + (i < extra) for i in range(nodes)]


@settings(max_examples=60, deadline=None)
@given(labelled(), st.floats(0.05, 50), st.integers(1, 5))
def test_unbalanced_uses_every_index_once_above_the_floor(
    case: tuple[np.ndarray, int, int], alpha: float, floor: int
) -> None:
    labels, nodes, seed = case
    floor = min(floor, len(labels) // nodes)
    parts = node_indices(
        labels, num_nodes=nodes, scheme="unbalanced", alpha=alpha, min_per_node=floor, seed=seed
    )
    _check_disjoint_sorted(parts, len(labels), complete=True)
    assert min(len(p) for p in parts) >= floor


@settings(max_examples=60, deadline=None)
@given(labelled(), st.sampled_from(["iid", "unbalanced"]))
def test_stratified_splits_keep_the_global_label_mix(
    case: tuple[np.ndarray, int, int], scheme: str
) -> None:
    labels, nodes, seed = case
    parts = node_indices(
        labels, num_nodes=nodes, scheme=scheme, alpha=0.3, min_per_node=1, seed=seed
    )
    counts = _class_counts(labels, parts)
    class_totals = np.bincount(labels, minlength=counts.shape[1])
    for node, part in enumerate(parts):
        share = len(part) / len(labels)
        expected = share * class_totals
        # dealing error: one slot per other node's interleaving, plus rounding at both block ends
        assert np.all(np.abs(counts[node] - expected) <= nodes * share + 2)


@settings(max_examples=60, deadline=None)
@given(labelled(), st.integers(1, 4))
def test_shards_give_every_node_k_classes_in_equal_amounts(
    case: tuple[np.ndarray, int, int], per_node: int
) -> None:
    labels, nodes, seed = case
    class_totals = np.bincount(labels)
    present = class_totals[class_totals > 0]
    feasible = per_node <= len(present) and np.minimum(present, nodes).sum() >= nodes * per_node
    if not feasible:
        with pytest.raises(ConfigError):
            node_indices(labels, num_nodes=nodes, scheme="shards", classes_per_node=per_node)
        return
    parts = node_indices(
        labels, num_nodes=nodes, scheme="shards", classes_per_node=per_node, seed=seed
    )
    _check_disjoint_sorted(parts, len(labels), complete=False)
    counts = _class_counts(labels, parts)
    shard = counts.max()
    assert np.all(np.isin(counts, [0, shard]))  # every held class in the same amount
    assert np.all((counts > 0).sum(axis=1) == per_node)  # exactly k different classes
    # the shard size is the largest for which enough shards exist
    assert np.minimum(present // (shard + 1), nodes).sum() < nodes * per_node


@settings(max_examples=30, deadline=None)
@given(labelled(), st.sampled_from(SPLITS))
def test_same_seed_same_split(case: tuple[np.ndarray, int, int], scheme: str) -> None:
    labels, nodes, seed = case
    args = {"num_nodes": nodes, "scheme": scheme, "classes_per_node": 1, "min_per_node": 1}
    first = node_indices(labels, seed=seed, **args)
    second = node_indices(labels, seed=seed, **args)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def _balanced_labels(per_class: int, num_classes: int = 10) -> np.ndarray:
    return np.repeat(np.arange(num_classes), per_class)


@pytest.mark.parametrize("scheme", SPLITS)
def test_different_seeds_give_different_splits(scheme: str) -> None:
    labels = _balanced_labels(100)
    first = node_indices(labels, num_nodes=5, scheme=scheme, seed=1)
    second = node_indices(labels, num_nodes=5, scheme=scheme, seed=2)
    assert any(not np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_iid_with_divisible_counts_gives_identical_label_mixes() -> None:
    labels = _balanced_labels(60)
    parts = node_indices(labels, num_nodes=6, scheme="iid", seed=3)
    assert np.all(_class_counts(labels, parts) == 10)


def _dominant_share(labels: np.ndarray, alpha: float) -> float:
    parts = node_indices(labels, num_nodes=10, scheme="noniid", alpha=alpha, seed=0)
    counts = _class_counts(labels, parts)
    return float((counts.max(axis=1) / counts.sum(axis=1)).mean())


def test_noniid_skew_follows_alpha() -> None:
    labels = _balanced_labels(500)
    assert _dominant_share(labels, 0.05) > 0.5  # mostly one or two labels per node
    assert _dominant_share(labels, 1000.0) < 0.13  # close to the uniform 0.1
    parts = node_indices(labels, num_nodes=10, scheme="noniid", alpha=0.05, seed=0)
    assert np.all(_class_counts(labels, parts).sum(axis=0) == 500)  # every example used


def test_unbalanced_size_skew_follows_alpha() -> None:
    labels = _balanced_labels(1000)

    def spread(alpha: float) -> float:
        sizes = [
            len(p) for p in node_indices(labels, num_nodes=10, scheme="unbalanced", alpha=alpha)
        ]
        return max(sizes) / min(sizes)

    assert spread(0.2) > 10
    assert spread(1e4) < 1.2


def test_shards_use_all_data_when_classes_divide_evenly() -> None:
    labels = _balanced_labels(100)
    parts = node_indices(labels, num_nodes=5, scheme="shards", classes_per_node=2, seed=0)
    assert sum(len(p) for p in parts) == 1000 and {len(p) for p in parts} == {200}


def test_sparse_label_values_are_fine() -> None:
    labels = np.array([3, 3, 900, 900, 42, 42] * 5)
    parts = node_indices(labels, num_nodes=3, scheme="shards", classes_per_node=1, seed=0)
    assert sorted(len(set(labels[p].tolist())) for p in parts) == [1, 1, 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_nodes": 11, "scheme": "iid"}, "more nodes than examples"),
        ({"num_nodes": 0, "scheme": "iid"}, "num_nodes must be >= 1"),
        ({"num_nodes": 2, "scheme": "noniid", "alpha": 0.0}, "alpha must be"),
        ({"num_nodes": 2, "scheme": "unbalanced", "alpha": -1.0}, "alpha must be"),
        ({"num_nodes": 2, "scheme": "noniid", "alpha": math.nan}, "alpha must be"),
        ({"num_nodes": 3, "scheme": "unbalanced", "min_per_node": 4}, "at least 4 examples"),
        ({"num_nodes": 2, "scheme": "shards", "classes_per_node": 3}, "exceeds the 2 classes"),
        ({"num_nodes": 2, "scheme": "iid", "seed": -1}, "seed must be >= 0"),
    ],
)
def test_impossible_requests_raise_config_errors(kwargs: dict[str, object], message: str) -> None:
    labels = np.array([0, 1] * 5)
    with pytest.raises(ConfigError, match=message):
        node_indices(labels, **kwargs)  # type: ignore[arg-type]


def test_unknown_scheme_lists_the_valid_ones() -> None:
    with pytest.raises(UnknownNameError, match="iid, label_swap, noniid, rotated, shards"):
        node_indices(np.zeros(4, dtype=np.int64), num_nodes=2, scheme="dirichlet")


@pytest.mark.parametrize(
    "labels", [np.zeros((2, 2), dtype=np.int64), np.array([0.0, 1.0]), np.array([0, -1])]
)
def test_malformed_labels_are_rejected(labels: np.ndarray) -> None:
    with pytest.raises(ConfigError):
        node_indices(labels, num_nodes=1, scheme="iid")


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 200), st.floats(0, 0.99), st.integers(0, 1000))
def test_train_val_split_partitions_a_node(count: int, fraction: float, seed: int) -> None:
    indices = np.random.default_rng(seed).choice(10_000, size=count, replace=False)
    split = train_val_split(indices, val_fraction=fraction, seed=seed)
    assert split.train.dtype == np.int64 and split.val.dtype == np.int64
    joined = np.concatenate([split.train, split.val])
    assert sorted(joined.tolist()) == sorted(indices.tolist())
    if count:
        assert len(split.train) >= 1
        assert abs(len(split.val) - count * fraction) <= 1 or len(split.val) == count - 1
    again = train_val_split(indices, val_fraction=fraction, seed=seed)
    assert np.array_equal(again.val, split.val)


def test_train_val_split_is_eighty_twenty_by_default() -> None:
    split = train_val_split(np.arange(1000))
    assert (len(split.train), len(split.val)) == (800, 200)
    assert train_val_split(np.arange(1)).train.tolist() == [0]


def test_train_val_split_rejects_bad_fractions() -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        train_val_split(np.arange(10), val_fraction=1.0)


def test_split_nodes_follows_the_config() -> None:
    labels = _balanced_labels(50)
    config = DataConfig(num_nodes=4, split="noniid", alpha=0.3, val_fraction=0.25, seed=7)
    splits = split_nodes(labels, config)
    assert len(splits) == 4 and all(isinstance(s, NodeSplit) for s in splits)
    joined = np.concatenate([np.concatenate([s.train, s.val]) for s in splits])
    assert sorted(joined.tolist()) == list(range(500))
    assert all(len(s.val) == round(0.25 * (len(s.train) + len(s.val))) for s in splits)
    again = split_nodes(labels, config)
    assert all(np.array_equal(a.val, b.val) for a, b in zip(splits, again, strict=True))


@pytest.mark.timeout(120)
def test_real_mnist_splits() -> None:
    from fedtorrent.data.datasets import load_dataset

    try:
        labels = load_dataset("mnist", progress=False).y_train
    except DataError:
        if os.environ.get("FEDTORRENT_DATA"):
            raise
        pytest.skip("MNIST not available offline")
    iid = node_indices(labels, num_nodes=6, scheme="iid")
    _check_disjoint_sorted(iid, 60_000, complete=True)
    shards = node_indices(labels, num_nodes=10, scheme="shards", classes_per_node=2)
    assert {len(p) for p in shards} == {5420}  # 2 shards of 5421 // 2 examples
    assert all(len(np.unique(labels[p])) == 2 for p in shards)
