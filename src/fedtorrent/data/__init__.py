"""Datasets (find, verify, download, parse) and how they are split across nodes."""

from fedtorrent.data.datasets import DATASET_NAMES, Dataset, load_dataset
from fedtorrent.data.partition import NodeSplit, node_indices, split_nodes, train_val_split

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "NodeSplit",
    "load_dataset",
    "node_indices",
    "split_nodes",
    "train_val_split",
]
