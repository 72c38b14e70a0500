"""A simulated run end to end: split the data, build the engine, run the rounds, write the folder.

A run folder holds, for every (mixing rule, seed) pair that was run:

- ``rounds.jsonl`` / ``rounds.csv``: per round and node, test accuracy and loss, accuracy on the
  node's own label mix, and the node's weight on itself;
- ``final.jsonl`` / ``final.csv``: per node, accuracy, macro precision / recall / F1, loss,
  own-distribution accuracy (and in JSON Lines the confusion matrix);
- ``trust.jsonl``: mixing-weight snapshots ``W`` (``N x N``, row i = node i's weights);
- ``summary.json``: the configs, mean and std of the scores per rule, time spent per phase, and
  with privacy or attackers the security metric (``fedtorrent.sim.scenario``);
- ``plots/``: drawn from those files by :mod:`fedtorrent.metrics.plots`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedtorrent.config import SimConfig
from fedtorrent.errors import ConfigError
from fedtorrent.metrics.records import (
    FINAL_FIELDS,
    ROUND_FIELDS,
    RecordWriter,
    write_json,
)
from fedtorrent.sim.engine import Engine, ShareFn, make_backend, node_data
from fedtorrent.sim.topology import Topology
from fedtorrent.training.schedule import round_lr_scale
from fedtorrent.training.seeds import derive_seed

if TYPE_CHECKING:
    from fedtorrent.data.datasets import Dataset

RoundCallback = Callable[[int, int], None]
"""Called after each round with (rounds done, rounds in this run)."""
LABEL_SKEWED = ("noniid", "shards")
"""Splits where accuracy on a node's own label mix differs from global test accuracy."""
TRUST_SNAPSHOT_NODES = 16
"""Up to this many nodes, learned trust is snapshotted at every evaluated round."""


@dataclass(frozen=True)
class RunOutcome:
    """What one (config, seed) run produced, beside the records it wrote."""

    config: SimConfig
    final: list[dict[str, Any]]
    """Per node: accuracy, precision, recall, f1, loss, own_accuracy, train_examples, confusion."""
    weights: list[list[float]] | None
    """The last round's mixing weights (None for robust rules)."""
    timings: dict[str, float]
    wall_seconds: float
    security: dict[str, Any] | None = None
    """With privacy or attackers: see :func:`fedtorrent.sim.scenario.security_summary`."""
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)
    """Received rows left out of mixes, by reason (:func:`engine_rejections`); empty when none."""

    @property
    def accuracies(self) -> list[float]:
        """Final test accuracy of every node."""
        return [float(r["accuracy"]) for r in self.final]


@dataclass
class RunWriters:
    """The open record files of a run folder (any may be None: that record is not written)."""

    rounds: RecordWriter | None = None
    final: RecordWriter | None = None
    trust: RecordWriter | None = None


def load_for(config: SimConfig) -> Dataset:
    """Load the dataset ``config`` names (from ``data_dir``, ``$FEDTORRENT_DATA`` or the cache)."""
    from fedtorrent.data.datasets import load_dataset  # noqa: PLC0415

    return load_dataset(config.data.dataset, data_dir=config.data.data_dir, progress=False)


def run_one(
    config: SimConfig,
    *,
    dataset: Dataset,
    on_round: RoundCallback | None = None,
    share: ShareFn | None = None,
    writers: RunWriters | None = None,
) -> RunOutcome:
    """Run one configuration (one seed) and return its final per-node scores.

    Args:
        config: the run.
        dataset: the loaded dataset named by ``config.data.dataset``.
        on_round: progress callback.
        share: what nodes send each other (adversaries, privacy); default their parameters.
        writers: open record writers (see :func:`simulate`); None writes nothing.
    """
    from fedtorrent.data.partition import split_nodes  # noqa: PLC0415
    from fedtorrent.models import build_model  # noqa: PLC0415
    from fedtorrent.sim import scenario  # noqa: PLC0415
    from fedtorrent.state import flatten  # noqa: PLC0415

    if dataset.name != config.data.dataset:
        raise ConfigError(f"dataset {dataset.name!r} given for a {config.data.dataset!r} run")
    started = time.perf_counter()
    splits = split_nodes(dataset.y_train, config.data)
    data = node_data(
        x_train=dataset.x_train,
        y_train=dataset.y_train,
        x_test=dataset.x_test,
        y_test=dataset.y_test,
        splits=[(s.train, s.val) for s in splits],
        num_classes=dataset.num_classes,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, 0))
        model = build_model(
            config.model.name,
            input_shape=tuple(dataset.input_shape),
            num_classes=dataset.num_classes,
            **config.model.kwargs,
        )
    n = config.data.num_nodes
    init = flatten(model.state_dict())
    outgoing: scenario.Outgoing | None = None
    if config.attack is not None or config.privacy is not None:
        if share is not None:
            raise ConfigError("give a share hook or a config with privacy/attack, not both")
        outgoing = share = scenario.Outgoing(config, initial=init)
        if config.attack == "label_flip":
            data = scenario.poison_labels(data, outgoing.attackers)
    engine = Engine(
        backend=make_backend(model, input_shape=tuple(dataset.input_shape)),
        data=data,
        train=config.train,
        mixing=config.mixing,
        topology=Topology(config.topology, num_nodes=n, seed=config.seed),
        init=init,
        seed=config.seed,
        share=share,
    )
    label_mix = _label_mix(dataset.y_train, [s.train for s in splits], dataset.num_classes)
    curve_x, curve_y = _curve_subset(config, data.x_test, data.y_test)
    tag = {"mixing": config.mixing.rule, "seed": config.seed}
    writers = writers or RunWriters()
    weights: torch.Tensor | None = None
    on_attackers: list[float] = []
    for round_index in range(config.rounds):
        scale = round_lr_scale(config.round_schedule, round_index, config.rounds)
        weights = engine.run_round(round_index, lr_scale=scale)
        done = round_index + 1
        if outgoing is not None and outgoing.attackers:
            value = scenario.weight_on_attackers(
                weights,
                engine.topology.cohorts(round_index),
                honest=outgoing.honest,
                attackers=outgoing.attackers,
            )
            if value is not None:
                on_attackers.append(value)
        epsilon = outgoing.epsilon if outgoing is not None else None
        if done % config.eval_every == 0 or done == config.rounds:
            evaluation = engine.evaluate(curve_x, curve_y)
            accuracy = evaluation.accuracy.tolist()
            own = evaluation.weighted_accuracy(label_mix).tolist()
            loss = evaluation.loss.tolist()
            self_weight = weights.diagonal().tolist() if weights is not None else [math.nan] * n
            if writers.rounds is not None:
                for node in range(n):
                    writers.rounds.write(
                        {
                            **tag,
                            "round": done,
                            "node": node,
                            "test_accuracy": accuracy[node],
                            "test_loss": loss[node],
                            "own_accuracy": own[node],
                            "self_weight": self_weight[node],
                            **({} if epsilon is None else {"epsilon": epsilon}),
                        }
                    )
            if writers.trust is not None and weights is not None and _snapshot(config, done):
                writers.trust.write({**tag, "round": done, "weights": weights.tolist()})
        if on_round is not None:
            on_round(done, config.rounds)
    final = _final_scores(engine, label_mix, data.train_count.tolist())
    if writers.final is not None:
        for node, record in enumerate(final):
            writers.final.write({**tag, "node": node, **record})
    security = None
    if outgoing is not None:
        security = scenario.security_summary(
            final,
            honest=outgoing.honest,
            attackers=outgoing.attackers,
            weights_per_round=on_attackers,
            rejected=engine_rejections(engine),
            epsilon=outgoing.epsilon,
        )
    return RunOutcome(
        config=config,
        final=final,
        weights=None if weights is None else weights.tolist(),
        timings=engine.timings.as_dict(),
        wall_seconds=time.perf_counter() - started,
        security=security,
        rejected=engine_rejections(engine),
    )


def engine_rejections(engine: Engine) -> dict[str, int]:
    """What the engine left out of mixes, by reason, nonzero counts only.

    ``non_finite`` and ``implausible`` count received rows per receiver (``Engine.rejected``,
    ``Engine.implausible``); ``trust_excluded`` cohort members learned trust excluded for a round;
    ``unmixed`` rows whose mix was not finite and kept their own parameters.
    """
    counts = {
        "non_finite": engine.rejected,
        "implausible": engine.implausible,
        "trust_excluded": engine.trust_excluded,
        "unmixed": engine.unmixed,
    }
    return {reason: count for reason, count in counts.items() if count}


def _snapshot(config: SimConfig, done: int) -> bool:
    if done == config.rounds:
        return True
    return config.mixing.rule == "learned" and config.data.num_nodes <= TRUST_SNAPSHOT_NODES


def _label_mix(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> torch.Tensor:
    """``(N, C)`` each node's training label distribution."""
    rows = [np.bincount(labels[p], minlength=num_classes) / max(1, len(p)) for p in parts]
    return torch.from_numpy(np.stack(rows))


def _curve_subset(
    config: SimConfig, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if config.eval_examples is None or config.eval_examples >= len(y):
        return None, None
    generator = torch.Generator().manual_seed(derive_seed(config.seed, 5))
    pick = torch.randperm(len(y), generator=generator)[: config.eval_examples]
    return x[pick], y[pick]


def _final_scores(
    engine: Engine, label_mix: torch.Tensor, train_counts: list[int]
) -> list[dict[str, Any]]:
    from fedtorrent.training.evaluate import classification_metrics  # noqa: PLC0415

    evaluation = engine.evaluate(keep_predictions=True)
    assert evaluation.predictions is not None
    own = evaluation.weighted_accuracy(label_mix).tolist()
    truth = engine.data.y_test.numpy()
    out = []
    for node in range(engine.num_nodes):
        metrics = classification_metrics(
            truth,
            evaluation.predictions[node].numpy(),
            num_classes=engine.data.num_classes,
            loss=float(evaluation.loss[node]),
        )
        record = metrics.to_dict()
        record.pop("num_examples", None)
        record["own_accuracy"] = own[node]
        record["train_examples"] = train_counts[node]
        out.append(record)
    return out


def summarize(outcomes: Sequence[RunOutcome]) -> dict[str, Any]:
    """Mean and std of final scores per mixing rule, over nodes and seeds.

    ``accuracy_std`` pools every (seed, node) pair; ``accuracy_std_nodes`` is the mean over seeds
    of the std across nodes; ``accuracy_std_seeds`` the std over seeds of the node mean, and
    ``accuracy_per_seed`` that node mean run by run (``seeds`` says which), for paired comparisons.
    """
    by_rule: dict[str, list[RunOutcome]] = {}
    for outcome in outcomes:
        by_rule.setdefault(outcome.config.mixing.rule, []).append(outcome)
    summary: dict[str, Any] = {}
    for rule, runs in by_rule.items():
        acc = np.array([r.accuracies for r in runs], dtype=np.float64)
        own = np.array([[float(x["own_accuracy"]) for x in r.final] for r in runs])
        f1 = np.array([[float(x["f1"]) for x in r.final] for r in runs])
        summary[rule] = {
            "runs": len(runs),
            "seeds": [r.config.seed for r in runs],
            "accuracy_mean": float(acc.mean()),
            "accuracy_std": float(acc.std()),
            "accuracy_std_nodes": float(acc.std(axis=1).mean()),
            "accuracy_std_seeds": float(acc.mean(axis=1).std()),
            "accuracy_per_seed": [float(v) for v in acc.mean(axis=1)],
            "own_accuracy_mean": float(own.mean()),
            "own_accuracy_std": float(own.std()),
            "f1_mean": float(f1.mean()),
            "rejected": _sum_counts(r.rejected for r in runs),
            "wall_seconds": float(sum(r.wall_seconds for r in runs)),
            "timings": {
                phase: float(sum(r.timings[phase] for r in runs)) for phase in runs[0].timings
            },
        }
        secured = [r.security for r in runs if r.security is not None]
        if secured:
            summary[rule]["security"] = _pool_security(secured)
    return summary


def _pool_security(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Security metrics of several seeds: means (std of the honest accuracy over all seeds)."""

    def mean(key: str) -> float | None:
        values = [float(p[key]) for p in parts if p.get(key) is not None]
        return sum(values) / len(values) if values else None

    rejected = _sum_counts(p["rejected"] for p in parts)
    return {
        "attackers": parts[0]["attackers"],
        "honest_accuracy_mean": mean("honest_accuracy_mean"),
        "honest_accuracy_std": mean("honest_accuracy_std"),
        "honest_accuracy_std_seeds": float(np.std([p["honest_accuracy_mean"] for p in parts])),
        "attacker_accuracy_mean": mean("attacker_accuracy_mean"),
        "weight_to_attackers": mean("weight_to_attackers"),
        "rejected": rejected,
        "epsilon": mean("epsilon"),
    }


def _sum_counts(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in parts:
        for reason, count in part.items():
            total[reason] = total.get(reason, 0) + int(count)
    return total


def config_dict(config: SimConfig) -> dict[str, Any]:
    """``config`` as JSON-ready nested dicts."""

    def convert(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return {k: convert(v) for k, v in dataclasses.asdict(config).items()}


def simulate(
    configs: Sequence[SimConfig],
    *,
    out_dir: Path | None,
    dataset: Dataset | None = None,
    on_round: Callable[[SimConfig, int, int], None] | None = None,
    share: ShareFn | None = None,
    plots: bool = True,
) -> tuple[list[RunOutcome], dict[str, Any]]:
    """Run several configurations (rules, seeds) of one dataset into one run folder.

    Args:
        configs: the runs; they must all use the same dataset.
        out_dir: the run folder (created; records are appended); None writes nothing.
        dataset: the loaded dataset, else it is loaded from ``configs[0]``.
        on_round: progress callback ``(config, rounds done, rounds)``.
        share: passed to every run (see :data:`ShareFn`).
        plots: draw the plots into ``out_dir/plots`` at the end.

    Returns:
        The outcomes in order, and the summary also written to ``summary.json``.
    """
    if not configs:
        raise ConfigError("nothing to simulate: no configurations")
    names = {c.data.dataset for c in configs}
    if len(names) != 1:
        raise ConfigError(f"one run folder holds one dataset, got {sorted(names)}")
    dataset = dataset or load_for(configs[0])
    outcomes: list[RunOutcome] = []
    with ExitStack() as stack:
        writers = RunWriters()
        if out_dir is not None:
            writers = RunWriters(
                rounds=stack.enter_context(
                    RecordWriter(out_dir, name="rounds", fields=ROUND_FIELDS)
                ),
                final=stack.enter_context(RecordWriter(out_dir, name="final", fields=FINAL_FIELDS)),
                trust=stack.enter_context(
                    RecordWriter(out_dir, name="trust", fields=("mixing", "seed", "round"))
                ),
            )
        for config in configs:
            callback = None if on_round is None else functools.partial(on_round, config)
            outcomes.append(
                run_one(config, dataset=dataset, on_round=callback, share=share, writers=writers)
            )
    summary = {"by_mixing": summarize(outcomes), "configs": [config_dict(c) for c in configs]}
    if out_dir is not None:
        write_json(out_dir / "summary.json", summary)
        if plots:
            from fedtorrent.metrics.plots import plot_run_folder  # noqa: PLC0415

            plot_run_folder(out_dir)
    return outcomes, summary
