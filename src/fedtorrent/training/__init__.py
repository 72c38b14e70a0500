"""Local training and evaluation on tensors: no networking, no printing but an opt-in bar."""

from fedtorrent.training.evaluate import (
    Metrics,
    classification_metrics,
    evaluate,
    predict,
    train_centralized,
)
from fedtorrent.training.local import make_optimizer, num_batches, train_local
from fedtorrent.training.schedule import round_lr_scale

__all__ = [
    "Metrics",
    "classification_metrics",
    "evaluate",
    "make_optimizer",
    "num_batches",
    "predict",
    "round_lr_scale",
    "train_centralized",
    "train_local",
]
