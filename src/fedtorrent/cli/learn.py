"""Commands: ``train`` (the centralized baseline) and ``partition`` (how a split looks per node)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from fedtorrent.cli import app
from fedtorrent.config import BASELINE_TRAIN, SPLITS, DataConfig, ModelConfig, TrainConfig
from fedtorrent.errors import ConfigError, UnknownNameError
from fedtorrent.files import write_atomic

if TYPE_CHECKING:
    from fedtorrent.training.evaluate import Metrics

_DATASET_HELP = "mnist, fashion-mnist, cifar10 or digits (scikit-learn's, offline)."
_DATA_DIR_HELP = "Folder searched first for dataset files (else $FEDTORRENT_DATA, then the cache)."


@app.command()
def train(
    *,
    dataset: Annotated[str, typer.Option(help=_DATASET_HELP)] = "mnist",
    model: Annotated[str, typer.Option(help="logreg, mlp, cnn (28x28) or cnn32 (32x32x3).")] = (
        "logreg"
    ),
    epochs: Annotated[int, typer.Option(help="Passes over the training set.")] = (
        BASELINE_TRAIN.epochs
    ),
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = BASELINE_TRAIN.lr,
    batch_size: Annotated[int, typer.Option()] = BASELINE_TRAIN.batch_size,
    optimizer: Annotated[str, typer.Option(help="sgd or adam.")] = BASELINE_TRAIN.optimizer,
    schedule: Annotated[str, typer.Option(help="constant or cosine (decay to 0).")] = (
        BASELINE_TRAIN.lr_schedule
    ),
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = BASELINE_TRAIN.momentum,
    weight_decay: Annotated[float, typer.Option()] = BASELINE_TRAIN.weight_decay,
    seed: Annotated[int, typer.Option(help="Seeds the model weights and the shuffling.")] = (
        BASELINE_TRAIN.seed
    ),
    data_dir: Annotated[Path | None, typer.Option(help=_DATA_DIR_HELP)] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the metrics to this JSON file.")
    ] = None,
    per_class: Annotated[bool, typer.Option(help="Also print per-class scores.")] = False,
    confusion: Annotated[bool, typer.Option(help="Also print the confusion matrix.")] = False,
    threads: Annotated[
        int, typer.Option(help="Torch CPU threads; small models train fastest on one.")
    ] = 1,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
) -> None:
    """Train one model on all training data and print its test metrics (the baseline)."""
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        lr_schedule=schedule,
        momentum=momentum,
        weight_decay=weight_decay,
        seed=seed,
    )
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    if json_path is not None:  # its folder is made now, so a mistake fails before training
        try:
            json_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"cannot write {json_path}: {error.strerror or error}") from error

    import torch  # noqa: PLC0415 (lazy: keep --help fast)

    from fedtorrent.data.datasets import load_dataset  # noqa: PLC0415
    from fedtorrent.models import model_names  # noqa: PLC0415
    from fedtorrent.training.evaluate import train_centralized  # noqa: PLC0415

    if model not in model_names():  # fail before loading data
        raise UnknownNameError("model", model, model_names())
    torch.set_num_threads(threads)
    data = load_dataset(dataset, data_dir=data_dir, progress=progress)
    started = time.perf_counter()
    _, metrics = train_centralized(data, ModelConfig(name=model), config, progress=progress)
    seconds = time.perf_counter() - started

    _print_wide(_summary_table(metrics, title=f"{model} on {data.name}", seconds=seconds))
    if per_class:
        _print_wide(_per_class_table(metrics, data.classes))
    if confusion:
        _print_wide(_confusion_table(metrics))
    if json_path is not None:
        record = {
            "dataset": data.name,
            "model": model,
            "train": asdict(config),
            "seconds": seconds,
            "metrics": metrics.to_dict(),
        }
        try:
            write_atomic(json_path, (json.dumps(record, indent=2) + "\n").encode())
        except OSError as error:
            raise ConfigError(f"cannot write {json_path}: {error.strerror}") from error


@app.command()
def partition(
    *,
    dataset: Annotated[str, typer.Option(help=_DATASET_HELP)] = "mnist",
    nodes: Annotated[int, typer.Option(help="How many nodes to split across.")] = 6,
    split: Annotated[str, typer.Option(help=f"{', '.join(SPLITS)}.")] = "iid",
    alpha: Annotated[
        float, typer.Option(help="Dirichlet concentration (noniid: labels; unbalanced: sizes).")
    ] = 0.5,
    classes_per_node: Annotated[int, typer.Option(help="Classes per node for shards.")] = 2,
    min_per_node: Annotated[int, typer.Option(help="Smallest node for unbalanced.")] = 10,
    val_fraction: Annotated[float, typer.Option(help="Validation share inside each node.")] = 0.2,
    seed: Annotated[int, typer.Option()] = 0,
    clusters: Annotated[
        int, typer.Option(help="Clusters for label_swap and rotated (dealt as iid).")
    ] = 1,
    data_dir: Annotated[Path | None, typer.Option(help=_DATA_DIR_HELP)] = None,
) -> None:
    """Split the training set across nodes and print per-node sizes and label counts."""
    config = DataConfig(
        dataset=dataset,
        data_dir=data_dir,
        num_nodes=nodes,
        split=split,
        alpha=alpha,
        classes_per_node=classes_per_node,
        min_per_node=min_per_node,
        val_fraction=val_fraction,
        seed=seed,
        clusters=clusters,
    )
    import numpy as np  # noqa: PLC0415 (lazy: keep --help fast)

    from fedtorrent.data.datasets import load_dataset  # noqa: PLC0415
    from fedtorrent.data.partition import split_nodes  # noqa: PLC0415

    data = load_dataset(config.dataset, data_dir=config.data_dir)
    splits = split_nodes(data.y_train, config)
    used = sum(len(s.train) + len(s.val) for s in splits)
    caption = f"label counts over train+val; {used} of {len(data.y_train)} examples used"
    if data.classes != tuple(str(i) for i in range(data.num_classes)):
        caption += "; classes: " + ", ".join(f"{i}={name}" for i, name in enumerate(data.classes))
    table = Table(
        title=f"{data.name} across {nodes} nodes: {split} split (seed {seed})",
        caption=caption,
        box=box.SIMPLE_HEAD,
    )
    for header in ("node", "train", "val"):
        table.add_column(header, justify="right")
    for index in range(data.num_classes):
        table.add_column(str(index), justify="right")
    totals = np.zeros(data.num_classes, dtype=np.int64)
    for node, node_split in enumerate(splits):
        members = np.concatenate([node_split.train, node_split.val])
        histogram = np.bincount(data.y_train[members], minlength=data.num_classes)
        totals += histogram
        table.add_row(
            str(node),
            str(len(node_split.train)),
            str(len(node_split.val)),
            *(str(int(c)) for c in histogram),
        )
    table.add_section()
    table.add_row(
        "all",
        str(sum(len(s.train) for s in splits)),
        str(sum(len(s.val) for s in splits)),
        *(str(int(c)) for c in totals),
    )
    _print_wide(table)


def _print_wide(table: Table) -> None:
    """Print to stdout, widening the console rather than eliding numbers (pipes default to 80)."""
    console = Console()
    wanted = console.measure(table, options=console.options.update_width(1000)).maximum
    console.width = max(console.width, wanted)
    console.print(table)


def _summary_table(metrics: Metrics, *, title: str, seconds: float) -> Table:
    table = Table(title=f"{title}: test set, {metrics.num_examples} examples")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("accuracy", f"{metrics.accuracy:.4f}")
    table.add_row("macro precision", f"{metrics.precision:.4f}")
    table.add_row("macro recall", f"{metrics.recall:.4f}")
    table.add_row("macro F1", f"{metrics.f1:.4f}")
    if metrics.loss is not None:
        table.add_row("cross-entropy", f"{metrics.loss:.4f}")
    table.add_row("training time (s)", f"{seconds:.1f}")
    return table


def _per_class_table(metrics: Metrics, classes: tuple[str, ...]) -> Table:
    scores = metrics.per_class()
    table = Table(title="per class")
    for header in ("class", "precision", "recall", "F1", "support"):
        table.add_column(header, justify="left" if header == "class" else "right")
    for index, name in enumerate(classes):
        table.add_row(
            name if name == str(index) else f"{index} {name}",
            f"{scores['precision'][index]:.4f}",
            f"{scores['recall'][index]:.4f}",
            f"{scores['f1'][index]:.4f}",
            str(int(scores["support"][index])),
        )
    return table


def _confusion_table(metrics: Metrics) -> Table:
    size = len(metrics.confusion)
    table = Table(
        title="confusion matrix (rows: true class, columns: predicted)", box=box.SIMPLE_HEAD
    )
    table.add_column("true", justify="right")
    for index in range(size):
        table.add_column(str(index), justify="right")
    for index, row in enumerate(metrics.confusion):
        table.add_row(str(index), *(str(int(c)) for c in row))
    return table
