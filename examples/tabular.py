"""Tabular classification: scikit-learn's breast cancer data (569 rows, 30 features, 2 classes).

Every node holds its own stratified shard of the training rows; all nodes are scored on the same
held-out test rows. Features are standardized with the training rows' mean and std only.

Run it::

    fedtorrent simulate --task examples/tabular.py:task --nodes 3 --rounds 20 --mixing learned
    fedtorrent create --task examples/tabular.py:task --nodes 3 --cohort 2 --rounds 20 \
        -o runs/tabular/session.torrent
    fedtorrent swarm runs/tabular/session.torrent --task examples/tabular.py:task --peers 3 \
        --out runs/tabular
"""

from functools import cache

import numpy as np
from sklearn.datasets import load_breast_cancer
from torch import nn

import fedtorrent as ft

TEST_ROWS = 120
SEED = 0


@cache
def _arrays():
    """Standardized float32 features and int64 labels, test rows first."""
    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(SEED).permutation(len(y))
    x, y = x[order], y[order].astype(np.int64)
    train = x[TEST_ROWS:]
    x = ((x - train.mean(0)) / train.std(0)).astype(np.float32)  # train statistics only
    return x, y


def data(node, num_nodes):
    x, y = _arrays()
    x_test, y_test, x_train, y_train = x[:TEST_ROWS], y[:TEST_ROWS], x[TEST_ROWS:], y[TEST_ROWS:]
    mine = ft.split_nodes(y_train, ft.DataConfig(num_nodes=num_nodes, seed=SEED))[node]
    return ft.NodeData(
        train=(x_train[mine.train], y_train[mine.train]),
        val=(x_train[mine.val], y_train[mine.val]),
        test=(x_test, y_test),
    )


def model():
    return nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 2))


task = ft.Task(model=model, data=data)
