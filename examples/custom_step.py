"""A custom training step: gradient clipping and label smoothing on scikit-learn's digits.

``train_step`` does one whole optimizer step itself (zero_grad, backward, step), so it can smooth
the labels and clip the gradient norm in between. The digits (8x8 images, 10 classes) are flat
64-feature rows scaled to [0, 1]; every node holds its own stratified shard.

Run it::

    fedtorrent simulate --task examples/custom_step.py:task --nodes 4 --rounds 15 --mixing learned
    fedtorrent create --task examples/custom_step.py:task --nodes 4 --cohort 3 --rounds 15 \
        -o runs/custom/session.torrent
    fedtorrent swarm runs/custom/session.torrent --task examples/custom_step.py:task --peers 4 \
        --out runs/custom
"""

from functools import cache

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

import fedtorrent as ft

TEST_ROWS = 360
SEED = 0


@cache
def _arrays():
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(SEED).permutation(len(y))
    return (x[order] / 16).astype(np.float32), y[order].astype(np.int64)


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
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def clipped_smooth_step(model, batch, ctx):
    x, y = batch
    ctx.optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    ctx.optimizer.step()
    return loss.detach()


task = ft.Task(
    model=model,
    data=data,
    optimizer=lambda params: torch.optim.Adam(params, lr=0.01),
    train_step=clipped_smooth_step,
)
