"""Regression with MSE: scikit-learn's diabetes data (442 rows, 10 features), scored by R².

The target is standardized like the features (R² does not change with the target's scale), with
the training rows' statistics only; every node holds its own shard of the training rows.

Run it::

    fedtorrent simulate --task examples/regression.py:task --nodes 3 --rounds 20 --mixing learned
    fedtorrent create --task examples/regression.py:task --nodes 3 --cohort 2 --rounds 20 \
        -o runs/regression/session.torrent
    fedtorrent swarm runs/regression/session.torrent \
        --task examples/regression.py:task --peers 3 --out runs/regression
"""

from functools import cache

import numpy as np
import torch
from sklearn.datasets import load_diabetes
from torch import nn
from torch.nn import functional as F

import fedtorrent as ft

TEST_ROWS = 100
SEED = 0


@cache
def _arrays():
    """Standardized float32 features and targets shaped (N, 1), test rows first."""
    x, y = load_diabetes(return_X_y=True)
    order = np.random.default_rng(SEED).permutation(len(y))
    x, y = x[order], y[order, None]
    x_train, y_train = x[TEST_ROWS:], y[TEST_ROWS:]
    x = ((x - x_train.mean(0)) / x_train.std(0)).astype(np.float32)
    y = ((y - y_train.mean()) / y_train.std()).astype(np.float32)
    return x, y


def data(node, num_nodes):
    x, y = _arrays()
    rows = np.arange(TEST_ROWS, len(y))
    mine = np.array_split(np.random.default_rng(SEED).permutation(rows), num_nodes)[node]
    cut = len(mine) // 5  # a fifth of each shard for validation (learned trust fits on it)
    return ft.NodeData(
        train=(x[mine[cut:]], y[mine[cut:]]),
        val=(x[mine[:cut]], y[mine[:cut]]),
        test=(x[:TEST_ROWS], y[:TEST_ROWS]),
    )


def r2(output, target):
    residual = ((output - target) ** 2).sum()
    total = ((target - target.mean()) ** 2).sum()
    return {"r2": float(1 - residual / total)}


task = ft.Task(
    model=lambda: nn.Linear(10, 1),
    data=data,
    loss=F.mse_loss,
    metrics=r2,
    optimizer=lambda params: torch.optim.Adam(params, lr=0.02),
)
