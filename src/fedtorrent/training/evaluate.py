"""Evaluation metrics and the centralized baseline that decentralized runs are compared with.

Macro averages (precision, recall, F1) are unweighted means over the classes that occur in the
true labels or in the predictions; a class absent from both says nothing about the model and is
left out, so a node that only sees two classes is scored on those two. A class that occurs but is
never predicted has precision 0 (and one never present has recall 0), as in scikit-learn with
``zero_division=0``. Macro F1 is the mean of the per-class F1 scores, not the harmonic mean of
macro precision and recall.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from fedtorrent.config import ModelConfig, TrainConfig
from fedtorrent.errors import ConfigError
from fedtorrent.models import build_model
from fedtorrent.training.local import BatchCallback, train_local

if TYPE_CHECKING:
    from fedtorrent.data.datasets import Dataset


@dataclass(frozen=True, eq=False)  # field-wise == on arrays would raise; compare by identity
class Metrics:
    """Scores of one set of predictions; NaN where undefined (no examples, no classes present).

    ``confusion[t, p]`` counts examples of true class ``t`` predicted as ``p`` (int64, K x K).
    ``loss`` is the mean cross-entropy when the logits were available, else None.
    """

    accuracy: float
    precision: float
    recall: float
    f1: float
    confusion: np.ndarray
    loss: float | None = None

    @property
    def num_examples(self) -> int:
        """How many predictions were scored."""
        return int(self.confusion.sum())

    def per_class(self) -> dict[str, np.ndarray]:
        """Per-class ``precision``, ``recall``, ``f1`` (float64) and ``support`` (true counts)."""
        precision, recall, f1 = _per_class_scores(self.confusion)
        return {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": self.confusion.sum(axis=1),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the scalar scores, the example count and the confusion matrix as lists."""
        return {
            "accuracy": self.accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "loss": self.loss,
            "num_examples": self.num_examples,
            "confusion": self.confusion.tolist(),
        }


def classification_metrics(
    y_true: np.ndarray | torch.Tensor,
    y_pred: np.ndarray | torch.Tensor,
    *,
    num_classes: int,
    loss: float | None = None,
) -> Metrics:
    """Accuracy, macro precision/recall/F1 and the confusion matrix of integer labels.

    Raises:
        ConfigError: shapes differ, labels are not 1-D integers in ``[0, num_classes)``.
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    true = _labels(y_true, "y_true", num_classes)
    pred = _labels(y_pred, "y_pred", num_classes)
    if true.shape != pred.shape:
        raise ConfigError(f"y_true has shape {true.shape} but y_pred has {pred.shape}")
    confusion = np.bincount(true * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )
    precision, recall, f1 = _per_class_scores(confusion)
    present = (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0
    count = len(true)
    return Metrics(
        accuracy=float(np.trace(confusion) / count) if count else math.nan,
        precision=_mean(precision[present]),
        recall=_mean(recall[present]),
        f1=_mean(f1[present]),
        confusion=confusion.astype(np.int64),
        loss=loss,
    )


def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 4096) -> torch.Tensor:
    """Predicted class of every row of ``x`` (int64, on the CPU), in batches, without gradients."""
    labels = [logits.argmax(dim=1) for logits in _logits(model, x, batch_size)]
    return torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_classes: int, batch_size: int = 4096
) -> Metrics:
    """Score ``model`` on ``(x, y)``, including the mean cross-entropy as ``loss``."""
    if int(x.shape[0]) != int(y.shape[0]):
        raise ConfigError(f"x has {int(x.shape[0])} examples but y has {int(y.shape[0])}")
    targets = y.to("cpu", torch.int64)
    loss_sum, predictions, start = 0.0, [], 0
    for logits in _logits(model, x, batch_size):
        stop = start + len(logits)
        loss_sum += float(functional.cross_entropy(logits, targets[start:stop], reduction="sum"))
        predictions.append(logits.argmax(dim=1))
        start = stop
    count = int(x.shape[0])
    return classification_metrics(
        targets,
        torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.int64),
        num_classes=num_classes,
        loss=loss_sum / count if count else None,
    )


def train_centralized(
    dataset: Dataset, model: ModelConfig, train: TrainConfig, *, progress: bool = True
) -> tuple[nn.Module, Metrics]:
    """Train one model on the whole training set and score it on the test set.

    The reference each decentralized run is compared with. The model is built right after
    ``torch.manual_seed(train.seed)``, so a run is reproducible. ``progress`` draws a bar on
    stderr.
    """
    torch.manual_seed(train.seed)
    net = build_model(
        model.name,
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        **model.kwargs,
    )
    x_train, y_train = torch.from_numpy(dataset.x_train), torch.from_numpy(dataset.y_train)
    with _progress_bar(enabled=progress, description=f"{model.name} on {dataset.name}") as advance:
        train_local(net, x_train, y_train, train, on_batch=advance)
    metrics = evaluate(
        net,
        torch.from_numpy(dataset.x_test),
        torch.from_numpy(dataset.y_test),
        num_classes=dataset.num_classes,
    )
    return net, metrics


def _labels(values: np.ndarray | torch.Tensor, name: str, num_classes: int) -> np.ndarray:
    array = (
        values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    )
    if array.ndim != 1:
        raise ConfigError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ConfigError(f"{name} must hold integer labels, got {array.dtype}")
    array = array.astype(np.int64)
    if array.size and (int(array.min()) < 0 or int(array.max()) >= num_classes):
        raise ConfigError(f"{name} holds labels outside [0, {num_classes})")
    return array


def _per_class_scores(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 of every class; 0 where a denominator is 0."""
    hits = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    actual = confusion.sum(axis=1).astype(np.float64)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros_like(hits), where=actual > 0)
    both = predicted + actual
    f1 = np.divide(2 * hits, both, out=np.zeros_like(hits), where=both > 0)
    return precision, recall, f1


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def _logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Logits of ``x`` batch by batch (on the CPU), in eval mode; the previous mode is restored."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    device = next((p.device for p in model.parameters()), x.device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, int(x.shape[0]), batch_size):
                yield model(x[start : start + batch_size].to(device)).to("cpu", torch.float32)
    finally:
        model.train(was_training)


@contextmanager
def _progress_bar(*, enabled: bool, description: str) -> Iterator[BatchCallback | None]:
    """A rich progress bar on stderr fed by :func:`train_local`'s batch callback."""
    if not enabled:
        yield None
        return
    from rich.console import Console  # noqa: PLC0415 (lazy: only when a bar is wanted)
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TimeElapsedColumn,
    )

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance
