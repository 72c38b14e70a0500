"""A peer's data: its shard of the session's dataset, or examples it brings, plus the test set.

Every peer splits the dataset with the torrent's data settings, so the shards of a swarm match
the simulator's; own examples are ``.npy`` files read without ever unpickling. In a task session
the data is what the user's task returns (:func:`load_task_data`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedtorrent.data import load_dataset, split_nodes, train_val_split
from fedtorrent.data.clusters import node_examples
from fedtorrent.errors import ConfigError, DataError

if TYPE_CHECKING:
    from fedtorrent.config import DataConfig
    from fedtorrent.data import NodeSplit
    from fedtorrent.net.torrent import Session
    from fedtorrent.task import Task

_MAX_EXAMPLE_BYTES = 8 << 30


@dataclass(frozen=True, eq=False)
class PeerData:
    """One peer's tensors: its training and validation examples and the shared test set.

    ``num_classes`` is the class count of a classification session; 0 for a task without classes
    (any loss but cross-entropy). A split a task does not give is empty (zero rows).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's shape, e.g. ``(1, 28, 28)``."""
        return tuple(int(d) for d in self.x_train.shape[1:])


def load_peer_data(
    session: Session,
    *,
    node_index: int | None = None,
    num_nodes: int | None = None,
    examples: Path | None = None,
    data_dir: Path | None = None,
) -> PeerData:
    """This peer's shard, or its own examples, and the test set.

    Args:
        session: whose dataset and data settings (split, validation fraction, seed) apply.
        node_index: with ``num_nodes``: hold shard ``node_index`` of ``num_nodes``, split as
            every peer of the session splits it. With a clustered split (``label_swap``,
            ``rotated``) the shard and the test set are under the node's cluster's
            transformation (:mod:`fedtorrent.data.clusters`), as in the simulator.
        num_nodes: see ``node_index``.
        examples: or a folder with ``x.npy`` and ``y.npy`` (``read_examples``), and optionally
            ``x_test.npy`` / ``y_test.npy`` (else the dataset's test set).
        data_dir: where the dataset is (default ``$FEDTORRENT_DATA`` or the cache).

    Raises:
        DataError: the dataset or the example files are missing or malformed.
        ConfigError: neither a shard nor ``examples`` is given, or ``num_nodes`` is impossible
            for the dataset.
    """
    from fedtorrent.data.datasets import CLASSES  # noqa: PLC0415

    num_classes = len(CLASSES[session.data.dataset])
    if examples is None:
        if node_index is None or num_nodes is None:
            raise ConfigError("give either a node index with a number of nodes, or examples")
        # Memory-mapped (data.datasets): only this shard's rows are read and copied; the test set
        # stays one shared copy in the page cache for every peer on the machine.
        dataset = load_dataset(session.data.dataset, data_dir=data_dir, progress=False)
        data_config = dataclasses.replace(session.data, num_nodes=num_nodes)
        split = _splits(dataset.y_train, data_config)[node_index]
        train, val, test = node_examples(dataset, split, config=data_config, node=node_index)
        return PeerData(
            x_train=torch.from_numpy(train[0]), y_train=torch.from_numpy(train[1]),
            x_val=torch.from_numpy(val[0]), y_val=torch.from_numpy(val[1]),
            x_test=torch.from_numpy(test[0]), y_test=torch.from_numpy(test[1]),
            num_classes=dataset.num_classes,
        )  # fmt: skip
    x, y = read_examples(examples / "x.npy", examples / "y.npy", num_classes=num_classes)
    if (examples / "x_test.npy").exists() or (examples / "y_test.npy").exists():
        x_test, y_test = read_examples(
            examples / "x_test.npy", examples / "y_test.npy", num_classes=num_classes
        )
    else:
        dataset = load_dataset(session.data.dataset, data_dir=data_dir, progress=False)
        x_test, y_test = dataset.x_test, dataset.y_test.astype(np.int64)
    if x_test.shape[1:] != x.shape[1:]:
        raise DataError(f"test examples have shape {x_test.shape[1:]}, own ones {x.shape[1:]}")
    split = train_val_split(
        np.arange(len(y)), val_fraction=session.data.val_fraction, seed=session.data.seed
    )
    return PeerData(
        x_train=torch.from_numpy(x[split.train]),
        y_train=torch.from_numpy(y[split.train]),
        x_val=torch.from_numpy(x[split.val]),
        y_val=torch.from_numpy(y[split.val]),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)),
        y_test=torch.from_numpy(y_test),
        num_classes=num_classes,
    )


_SPLITS: dict[tuple[bytes, DataConfig], list[NodeSplit]] = {}
_SPLITS_LOCK = threading.Lock()


def _splits(labels: np.ndarray, config: DataConfig) -> list[NodeSplit]:
    """``split_nodes(labels, config)``, computed once per process for the peers it hosts."""
    key = (hashlib.sha256(labels.tobytes()).digest(), config)
    with _SPLITS_LOCK:
        if key not in _SPLITS:
            _SPLITS[key] = split_nodes(labels, config)
        return _SPLITS[key]


def task_node(node_index: int | None, num_nodes: int | None) -> tuple[int, int]:
    """``(node, num_nodes)`` a task's ``data`` is called with: the flags, else ``(0, 1)``.

    A peer that owns its data may leave ``--node-index`` and ``--num-nodes`` out; its ``data``
    then gets ``(0, 1)`` (all of it) and may ignore the arguments anyway.
    """
    if node_index is None or num_nodes is None:
        return 0, 1
    return node_index, num_nodes


def load_task_data(task: Task, *, node: int, num_nodes: int, num_classes: int | None) -> PeerData:
    """This peer's splits from ``task.data(node, num_nodes)``, read whole as tensors.

    ``(node, num_nodes)`` is what :func:`task_node` gives for the peer's flags. A Dataset split
    is read item by item into tensors (checked like tensors are). A missing ``val`` or ``test``
    becomes an empty split shaped like ``train``.

    Raises:
        DataError: the task's data function failed or returned data that does not check.
        ConfigError: the node index is outside ``[0, num_nodes)``.
    """
    node_data = task.node_data(node, num_nodes)
    x, y = node_data.tensors("train")
    splits = [
        node_data.tensors(name) if node_data.size(name) else (x[:0], y[:0])
        for name in ("val", "test")
    ]
    (x_val, y_val), (x_test, y_test) = splits
    return PeerData(
        x_train=x, y_train=y, x_val=x_val, y_val=y_val, x_test=x_test, y_test=y_test,
        num_classes=num_classes or 0,
    )  # fmt: skip


def read_examples(x_path: Path, y_path: Path, *, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and check ``x.npy`` (float32 or uint8, N, C, H, W) and ``y.npy`` (N integer labels).

    Arrays are memory-mapped first, so a header that claims a huge shape costs nothing before it
    is checked; never unpickles. uint8 images are scaled to [0, 1].

    Returns:
        ``x`` as float32 and ``y`` as int64, both C-contiguous copies.

    Raises:
        DataError: missing files, pickled or wrong dtypes, wrong shapes, non-finite values or
            labels outside ``[0, num_classes)``.
    """
    arrays = []
    for path in (x_path, y_path):
        try:
            if path.stat().st_size > _MAX_EXAMPLE_BYTES:
                raise DataError(f"{path} is larger than {_MAX_EXAMPLE_BYTES} bytes")
            arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {path}: {exc}") from None
    x, y = arrays
    if x.dtype not in (np.float32, np.uint8) or x.ndim != 4 or x.shape[0] < 1:
        raise DataError(f"{x_path}: need float32 or uint8 of shape (N, C, H, W), got {x.dtype} "
                        f"{x.shape}")  # fmt: skip
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (x.shape[0],):
        raise DataError(f"{y_path}: need {x.shape[0]} integer labels, got {y.dtype} {y.shape}")
    labels = np.array(y, dtype=np.int64)
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise DataError(f"{y_path}: labels must be in [0, {num_classes})")
    images = np.array(x, dtype=np.float32)
    if x.dtype == np.uint8:
        images /= 255.0
    elif not bool(np.isfinite(images).all()):
        raise DataError(f"{x_path}: holds NaN or infinite values")
    return images, labels
