from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import nn
from torch.nn import functional

from fedtorrent.config import BASELINE_TRAIN, ModelConfig, TrainConfig
from fedtorrent.errors import ConfigError, DataError
from fedtorrent.models import build_model
from fedtorrent.training import (
    classification_metrics,
    evaluate,
    num_batches,
    predict,
    train_centralized,
    train_local,
)


def _blobs(count: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well separated Gaussian blobs in 4-D."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (count,), generator=g)
    centres = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0]])
    return centres[y] + 0.5 * torch.randn(count, 4, generator=g), y


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("logreg", input_shape=(4,), num_classes=3)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_learns_separable_blobs(optimizer: str) -> None:
    x, y = _blobs()
    model = _model()
    config = TrainConfig(epochs=5, batch_size=16, lr=0.1 if optimizer == "sgd" else 0.05)
    config = replace(config, optimizer=optimizer)
    before = evaluate(model, x, y, num_classes=3)
    loss = train_local(model, x, y, config)
    after = evaluate(model, x, y, num_classes=3)
    assert after.accuracy > 0.95 and after.loss is not None and before.loss is not None
    assert after.loss < before.loss / 3
    assert 0 < loss < before.loss


def test_training_is_deterministic_under_the_seed() -> None:
    x, y = _blobs()
    runs = []
    for seed in (5, 5, 6):
        model = _model()
        loss = train_local(model, x, y, TrainConfig(epochs=2, batch_size=8, seed=seed))
        runs.append((loss, _params(model)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[2][1], strict=True))


def test_an_explicit_generator_drives_the_shuffling() -> None:
    x, y = _blobs()
    config = TrainConfig(epochs=1, batch_size=8, seed=0)
    first, second = _model(), _model()
    train_local(first, x, y, config, generator=torch.Generator().manual_seed(9))
    train_local(second, x, y, replace(config, seed=9))  # same stream as the generator above
    assert all(torch.equal(a, b) for a, b in zip(_params(first), _params(second), strict=True))


@pytest.mark.parametrize(
    ("epochs", "steps", "expected"), [(3, None, 3 * 25), (1, 7, 7), (1, 60, 60)]
)
def test_epochs_or_exactly_steps_batches(epochs: int, steps: int | None, expected: int) -> None:
    x, y = _blobs(count=200)
    config = TrainConfig(epochs=epochs, steps=steps, batch_size=8)
    calls: list[tuple[int, int]] = []
    train_local(_model(), x, y, config, on_batch=lambda done, total: calls.append((done, total)))
    assert calls == [(i, expected) for i in range(1, expected + 1)]
    assert num_batches(200, config) == expected


def test_nothing_to_do_returns_nan_and_leaves_the_model() -> None:
    x, y = _blobs()
    model = _model()
    before = _params(model)
    assert math.isnan(train_local(model, x, y, TrainConfig(epochs=0)))
    assert math.isnan(train_local(model, x[:0], y[:0], TrainConfig(epochs=3)))
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model), strict=True))


def test_cosine_schedule_matches_a_hand_written_loop() -> None:
    x, y = _blobs(count=32)
    config = TrainConfig(steps=4, batch_size=8, lr=0.5, lr_schedule="cosine", seed=3)
    model = _model()
    train_local(model, x, y, config)

    reference = _model()
    order = torch.randperm(32, generator=torch.Generator().manual_seed(3))
    for step in range(4):
        batch = order[step * 8 : (step + 1) * 8]
        reference.zero_grad()
        functional.cross_entropy(reference(x[batch]), y[batch]).backward()
        rate = 0.5 * 0.5 * (1 + math.cos(math.pi * step / 4))
        with torch.no_grad():
            for param in reference.parameters():
                assert param.grad is not None
                param.sub_(rate * param.grad)
    for a, b in zip(_params(model), _params(reference), strict=True):
        torch.testing.assert_close(a, b)


def test_mismatched_lengths_are_config_errors() -> None:
    x, y = _blobs()
    with pytest.raises(ConfigError, match="examples but y has"):
        train_local(_model(), x, y[:-1], TrainConfig())
    with pytest.raises(ConfigError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")


def test_metrics_on_a_hand_example() -> None:
    m = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], num_classes=4, loss=0.5)
    assert m.accuracy == pytest.approx(3 / 5)
    assert m.confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert m.confusion.dtype == np.int64
    # class 3 is absent from both and left out; class 2 counts with precision = recall = 0
    assert m.precision == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert m.recall == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert m.f1 == pytest.approx((1 / 2 + 0.8 + 0) / 3)
    scores = m.per_class()
    assert scores["support"].tolist() == [2, 2, 1, 0]
    record = json.loads(json.dumps(m.to_dict()))
    assert record["loss"] == 0.5 and record["num_examples"] == 5


def test_classes_absent_everywhere_do_not_dilute_macro_scores() -> None:
    m = classification_metrics(
        torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1]), num_classes=10
    )
    assert (m.accuracy, m.precision, m.recall, m.f1) == (1.0, 1.0, 1.0, 1.0)


@pytest.mark.filterwarnings("ignore:A single label was found")
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 80), st.integers(0, 10_000))
def test_metrics_agree_with_scikit_learn(num_classes: int, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    true = rng.integers(0, num_classes, count)
    pred = np.where(rng.random(count) < 0.6, true, rng.integers(0, num_classes, count))
    m = classification_metrics(true, pred, num_classes=num_classes)
    present = sorted(set(true.tolist()) | set(pred.tolist()))
    precision, recall, f1, _ = precision_recall_fscore_support(
        true, pred, labels=present, average="macro", zero_division=0
    )
    assert m.accuracy == pytest.approx(float(np.mean(true == pred)))
    assert (m.precision, m.recall, m.f1) == pytest.approx((precision, recall, f1))
    assert np.array_equal(m.confusion, confusion_matrix(true, pred, labels=range(num_classes)))


def test_empty_predictions_give_nan() -> None:
    m = classification_metrics(np.zeros(0, np.int64), np.zeros(0, np.int64), num_classes=3)
    assert math.isnan(m.accuracy) and math.isnan(m.f1) and m.num_examples == 0


@pytest.mark.parametrize(
    ("true", "pred", "message"),
    [
        ([0, 1], [0], "shape"),
        ([0, 3], [0, 1], "outside"),
        ([0, -1], [0, 1], "outside"),
        ([0.0, 1.0], [0, 1], "integer"),
        ([[0, 1]], [[0, 1]], "1-D"),
    ],
)
def test_malformed_labels_are_config_errors(true: object, pred: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        classification_metrics(true, pred, num_classes=3)  # type: ignore[arg-type]


def test_predict_and_evaluate_batch_without_changing_results_or_mode() -> None:
    x, y = _blobs(count=50)
    model = _model()
    model.train()
    expected = model(x).argmax(dim=1)
    assert torch.equal(predict(model, x, batch_size=7), expected)
    assert predict(model, x[:0]).shape == (0,)
    metrics = evaluate(model, x, y, num_classes=3, batch_size=7)
    assert metrics.loss == pytest.approx(
        float(functional.cross_entropy(model(x), y).detach()), rel=1e-5
    )
    assert metrics.accuracy == pytest.approx(float((expected == y).float().mean()))
    assert model.training  # the caller's mode is restored


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_centralized_digits_baseline_is_reproducible() -> None:
    from fedtorrent.data.datasets import load_dataset

    digits = load_dataset("digits")
    model, metrics = train_centralized(
        digits, ModelConfig("logreg"), BASELINE_TRAIN, progress=False
    )
    _, again = train_centralized(digits, ModelConfig("logreg"), BASELINE_TRAIN, progress=False)
    assert metrics.accuracy > 0.88 and metrics.num_examples == len(digits.y_test)
    assert np.array_equal(metrics.confusion, again.confusion)
    assert isinstance(model, nn.Module)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("name", "floor"), [("mnist", 0.92), ("fashion-mnist", 0.84)])
def test_centralized_logreg_reaches_the_seed_papers_accuracy(name: str, floor: float) -> None:
    from fedtorrent.data.datasets import load_dataset

    try:
        data = load_dataset(name, progress=False)
    except DataError:
        if os.environ.get("FEDTORRENT_DATA"):
            raise
        pytest.skip(f"{name} not available offline")
    _, metrics = train_centralized(data, ModelConfig("logreg"), BASELINE_TRAIN, progress=False)
    assert metrics.accuracy >= floor
