"""The built-in datasets and models as tasks, made the way a user makes one.

:func:`builtin_task` wraps :func:`fedtorrent.data.load_dataset`, :func:`fedtorrent.data.split_nodes`
and :func:`fedtorrent.models.build_model`; it adds no logic of its own, so node ``i`` of ``n`` gets
exactly the rows the simulator and a peer give it today. Its ``model`` and ``data`` are small
callable objects (:class:`BuiltinModel`, :class:`BuiltinData`) that also expose their settings, so
a driver can recognise a built-in task (to write its dataset and model names into a torrent, or to
index one shared training tensor instead of copying each node's rows).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedtorrent.config import DataConfig, ModelConfig
from fedtorrent.data.clusters import node_examples
from fedtorrent.data.datasets import CLASSES, DATASET_NAMES, INPUT_SHAPES, load_dataset
from fedtorrent.data.partition import split_nodes
from fedtorrent.errors import UnknownNameError
from fedtorrent.models import build_model, state_bytes
from fedtorrent.task.contract import NodeData, Task

if TYPE_CHECKING:
    from torch import nn

    from fedtorrent.data.datasets import Dataset
    from fedtorrent.data.partition import NodeSplit


@dataclass(frozen=True)
class BuiltinModel:
    """``() -> nn.Module``: a registered model for one dataset's input shape and classes."""

    config: ModelConfig
    input_shape: tuple[int, ...]
    num_classes: int

    def __post_init__(self) -> None:

        # Checks the name and arguments now, without torch, as build_model would later.
        state_bytes(
            self.config.name,
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            **self.config.kwargs,
        )

    def __call__(self) -> nn.Module:
        """A fresh model; weights from torch's global generator."""
        return build_model(
            self.config.name,
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            **self.config.kwargs,
        )


@dataclass(frozen=True, eq=False)
class BuiltinData:
    """``(node, num_nodes) -> NodeData``: node ``node``'s share of a built-in dataset.

    ``config.num_nodes`` is ignored: the split is made for the ``num_nodes`` of each call, with
    every other setting of ``config``. The dataset is loaded on the first call and each split
    computed once per node count. Every node's ``test`` is the dataset's whole test set (one
    tensor shared by all nodes); ``val`` is None when ``config.val_fraction`` leaves it empty.
    """

    config: DataConfig
    _dataset: list[Dataset] = field(default_factory=list, init=False, repr=False)
    _splits: dict[int, list[NodeSplit]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:

        if self.config.dataset not in DATASET_NAMES:
            raise UnknownNameError("dataset", self.config.dataset, DATASET_NAMES)

    def dataset(self) -> Dataset:
        """The loaded dataset (from ``data_dir``, ``$FEDTORRENT_DATA`` or the cache)."""
        if not self._dataset:
            self._dataset.append(
                load_dataset(self.config.dataset, data_dir=self.config.data_dir, progress=False)
            )
        return self._dataset[0]

    def splits(self, num_nodes: int) -> list[NodeSplit]:
        """Every node's train and validation indices into the training set, for ``num_nodes``."""
        if num_nodes not in self._splits:
            config = dataclasses.replace(self.config, num_nodes=num_nodes)
            self._splits[num_nodes] = split_nodes(self.dataset().y_train, config)
        return self._splits[num_nodes]

    def __call__(self, node: int, num_nodes: int) -> NodeData:
        """Node ``node``'s rows of the training set and the whole test set, as tensors.

        With a clustered split, all three are under the node's cluster's transformation.
        """
        dataset = self.dataset()
        split = self.splits(num_nodes)[node]
        config = dataclasses.replace(self.config, num_nodes=num_nodes)
        parts = node_examples(dataset, split, config=config, node=node)
        (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
            (torch.from_numpy(x), torch.from_numpy(y)) for x, y in parts
        )
        return NodeData(
            train=(x_train, y_train),
            val=(x_val, y_val) if len(split.val) else None,
            test=(x_test, y_test),
        )


def builtin_task(
    dataset: str,
    model: str,
    *,
    split: str = "iid",
    alpha: float = 0.5,
    classes_per_node: int = 2,
    min_per_node: int = 10,
    val_fraction: float = 0.2,
    seed: int = 0,
    clusters: int = 1,
    data_dir: str | Path | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> Task:
    """A built-in dataset and model as a :class:`Task` (cross-entropy, default metrics).

    The split arguments are those of :class:`~fedtorrent.config.DataConfig` (the node count comes
    from each ``data(node, num_nodes)`` call); ``model_kwargs`` go to the model's factory. Nothing
    is loaded until ``data`` is first called.

    Raises:
        UnknownNameError: an unknown dataset or model name.
        ConfigError: split settings or model arguments that are invalid.
    """
    data_config = DataConfig(
        dataset=dataset,
        data_dir=Path(data_dir) if data_dir is not None else None,
        split=split,
        alpha=alpha,
        classes_per_node=classes_per_node,
        min_per_node=min_per_node,
        val_fraction=val_fraction,
        seed=seed,
        clusters=clusters,
    )
    return builtin_task_from(data_config, ModelConfig(model, dict(model_kwargs or {})))


def builtin_task_from(data: DataConfig, model: ModelConfig) -> Task:
    """:func:`builtin_task` from the settings objects a ``SimConfig`` or a session holds."""
    data_factory = BuiltinData(data)  # checks the dataset name first
    factory = BuiltinModel(model, INPUT_SHAPES[data.dataset], len(CLASSES[data.dataset]))
    return Task(model=factory, data=data_factory)
