"""A simulated run end to end: split the data, build the engine, run the rounds, write the folder.

A run folder holds, for every (mixing rule, seed) pair that was run:

- ``rounds.jsonl`` / ``rounds.csv``: per round and node, test accuracy and loss, accuracy on the
  node's own distribution (``own_accuracy``), the node's weight on itself, and with a clustered
  split the share of its weight inside its true cluster (``cluster_share``);
- ``final.jsonl`` / ``final.csv``: per node, accuracy, macro precision / recall / F1, loss,
  own-distribution accuracy, ``cluster_share`` (and in JSON Lines the confusion matrix);

Own-distribution accuracy is accuracy on the test set as the node's own data is distributed:
with a clustered split (``label_swap``, ``rotated``) the test set under its cluster's
transformation (:mod:`fedtorrent.data.clusters`), else the test set reweighted to its label mix.
``accuracy`` is always on the test set as it is.
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

from fedtorrent.config import CLUSTERED_SPLITS, SimConfig
from fedtorrent.device import resolve_device
from fedtorrent.errors import ConfigError
from fedtorrent.files import write_atomic
from fedtorrent.metrics.records import (
    FINAL_FIELDS,
    ROUND_FIELDS,
    RecordWriter,
    write_json,
)
from fedtorrent.mixing.trust import private_trust
from fedtorrent.progress import Advance, progress_bar
from fedtorrent.sim.engine import (
    Engine,
    Evaluation,
    LinearBackend,
    NodeData,
    ShareFn,
    make_backend,
    node_data,
)
from fedtorrent.sim.loop import ModuleLoopBackend, StateLayout, has_buffers
from fedtorrent.sim.topology import Topology
from fedtorrent.sim.traffic import Traffic
from fedtorrent.state.codec import encode_state
from fedtorrent.state.compress import Compression
from fedtorrent.training.local import make_optimizer
from fedtorrent.training.schedule import round_lr_scale
from fedtorrent.training.seeds import Stream, derive_seed

if TYPE_CHECKING:
    from fedtorrent.data.clusters import Clusters
    from fedtorrent.data.datasets import Dataset
    from fedtorrent.task import Task

RoundCallback = Callable[[int, int], None]
"""Called after each round with (rounds done, rounds in this run)."""
LABEL_SKEWED = ("noniid", "shards")
"""Splits where accuracy on a node's own label mix differs from global test accuracy."""
TRUST_SNAPSHOT_NODES = 16
"""Up to this many nodes, learned trust and FedFomo weights are snapshotted at every evaluated
round."""


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
    engine_path: str = "vectorized"
    """How nodes trained: ``linear``, ``vectorized`` (stacked rows) or ``loop`` (per node)."""
    states: list[dict[str, torch.Tensor]] | None = None
    """Every node's final state dict, when asked for (``keep_states``, ``save_models``)."""
    model_paths: list[Path] = dataclasses.field(default_factory=list)
    """Where each node's final model was saved (``save_models``); empty otherwise."""
    traffic: dict[str, Any] | None = None
    """The bytes real peers would move for this run (``sim.traffic.Traffic.summary``)."""

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
    keep_states: bool = False,
    device: torch.device | str = "cpu",
) -> RunOutcome:
    """Run one configuration (one seed) and return its final per-node scores.

    A model with buffers (BatchNorm) runs on the per-node loop
    (:class:`~fedtorrent.sim.loop.ModuleLoopBackend`), any other on the stacked fast paths.

    Args:
        config: the run.
        dataset: the loaded dataset named by ``config.data.dataset``.
        on_round: progress callback.
        share: what nodes send each other (adversaries, privacy); default their parameters.
        writers: open record writers (see :func:`simulate`); None writes nothing.
        keep_states: return every node's final state dict (``RunOutcome.states``).
        device: where the engine trains, mixes and evaluates (see :class:`Engine`); results
            and states come back on the CPU.
    """
    from fedtorrent.data.clusters import clusters_for  # noqa: PLC0415
    from fedtorrent.data.partition import split_nodes  # noqa: PLC0415
    from fedtorrent.models import build_model  # noqa: PLC0415
    from fedtorrent.sim import scenario  # noqa: PLC0415
    from fedtorrent.state import flatten  # noqa: PLC0415

    if dataset.name != config.data.dataset:
        raise ConfigError(f"dataset {dataset.name!r} given for a {config.data.dataset!r} run")
    started = time.perf_counter()
    splits = split_nodes(dataset.y_train, config.data)
    clusters = clusters_for(config.data, num_classes=dataset.num_classes)
    x_train, y_train = dataset.x_train, dataset.y_train
    if clusters is not None:
        held = [np.concatenate([s.train, s.val]) for s in splits]
        x_train, y_train = clusters.transform_nodes(x_train, y_train, held)
    data = node_data(
        x_train=x_train,
        y_train=y_train,
        x_test=dataset.x_test,
        y_test=dataset.y_test,
        splits=[(s.train, s.val) for s in splits],
        num_classes=dataset.num_classes,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, Stream.INIT))
        model = build_model(
            config.model.name,
            input_shape=tuple(dataset.input_shape),
            num_classes=dataset.num_classes,
            **config.model.kwargs,
        )
    n = config.data.num_nodes
    privacies = scenario.example_privacies(
        config, data.train_count.tolist(), data.val_count.tolist()
    )
    backend = loop_backend(model, config) if has_buffers(model) else None
    shape = tuple(dataset.input_shape)
    stacked = None if backend is not None else make_backend(model, input_shape=shape)
    if privacies is not None and not isinstance(stacked, LinearBackend | None):
        # Example-level DP: per-example gradients in closed form on the linear path, through
        # torch.func on the per-node loop for any other model.
        backend, stacked = loop_backend(model, config), None
    init = (
        flatten(model.state_dict())
        if backend is None
        else backend.layout.flatten(model.state_dict())
    )
    outgoing: scenario.Outgoing | None = None
    update_dp = config.privacy is not None and config.privacy.update_level
    if config.attack is not None or update_dp or config.compression != "none":
        if share is not None:
            raise ConfigError(
                "give a share hook or a config with privacy/attack/compression, not both"
            )
        width = init.shape[0] if backend is None else backend.layout.num_params
        outgoing = share = scenario.Outgoing(config, initial=init[:width])
        if config.attack == "label_flip":
            data = scenario.poison_labels(data, outgoing.attackers)
    engine = Engine(
        backend=backend if backend is not None else stacked,  # type: ignore[arg-type]
        data=data,
        train=config.train,
        mixing=config.mixing,
        topology=Topology(
            config.topology, num_nodes=n, seed=config.seed, explore=config.mixing.trust_cohorts
        ),
        init=init,
        seed=config.seed,
        share=share,
        clusters=None if clusters is None else torch.from_numpy(clusters.assignment),
        device=device,
        dp=None if privacies is None else [p.dp for p in privacies],
        trust_dp=private_trust(config.privacy, config.mixing),
    )
    width = init.shape[0] if backend is None else backend.layout.num_params
    traffic = run_traffic(config, model, width=width)
    label_mix = _label_mix(dataset.y_train, [s.train for s in splits], dataset.num_classes)
    curve_x, curve_y = _curve_subset(config, data.x_test, data.y_test)
    own_curve = OwnTest(label_mix, clusters, curve_x, curve_y, data)
    tag = {"mixing": config.mixing.rule, "seed": config.seed}
    writers = writers or RunWriters()
    weights: torch.Tensor | None = None
    on_attackers: list[float | None] = []
    for round_index in range(config.rounds):
        scale = round_lr_scale(config.round_schedule, round_index, config.rounds)
        weights = engine.run_round(round_index, lr_scale=scale)
        scenario.charge_round(privacies, engine.releases)
        traffic.record(engine.topology.cohorts(round_index), round_index)
        done = round_index + 1
        if outgoing is not None and outgoing.attackers:
            value = scenario.weight_on_attackers(
                weights,
                engine.topology.cohorts(round_index),
                honest=outgoing.honest,
                attackers=outgoing.attackers,
            )
            on_attackers.append(value)
        epsilon = scenario.round_epsilons(outgoing, privacies, n)
        if done % config.eval_every == 0 or done == config.rounds:
            evaluation = engine.evaluate(curve_x, curve_y)
            accuracy = evaluation.accuracy.tolist()
            own = own_curve.accuracy(engine, evaluation).tolist()
            loss = evaluation.loss.tolist()
            self_weight = weights.diagonal().tolist() if weights is not None else [math.nan] * n
            in_cluster = _cluster_share(weights, clusters)
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
                            **({} if in_cluster is None else {"cluster_share": in_cluster[node]}),
                            **({} if epsilon is None else {"epsilon": epsilon[node]}),
                        }
                    )
            if writers.trust is not None and weights is not None and _snapshot(config, done):
                writers.trust.write({**tag, "round": done, "weights": weights.tolist()})
        if on_round is not None:
            on_round(done, config.rounds)
    own_final = own_curve if curve_x is None else OwnTest(label_mix, clusters, None, None, data)
    final = _final_scores(engine, own_final, data.train_count.tolist())
    in_cluster = _cluster_share(weights, clusters)
    if in_cluster is not None:
        for record, value in zip(final, in_cluster, strict=True):
            record["cluster_share"] = value
    if writers.final is not None:
        for node, record in enumerate(final):
            writers.final.write({**tag, "node": node, **record})
    security = None
    if outgoing is not None or privacies is not None:
        epsilons = scenario.round_epsilons(outgoing, privacies, n)
        security = scenario.security_summary(
            final,
            honest=outgoing.honest if outgoing is not None else list(range(n)),
            attackers=outgoing.attackers if outgoing is not None else [],
            weights_per_round=on_attackers,
            rejected=engine_rejections(engine),
            epsilon=None if epsilons is None else max(epsilons),  # the worst node's
            attack_from=config.attack_from,
        )
    return RunOutcome(
        config=config,
        final=final,
        weights=None if weights is None else weights.tolist(),
        timings=engine.timings.as_dict(),
        wall_seconds=time.perf_counter() - started,
        security=security,
        rejected=engine_rejections(engine),
        engine_path=engine_path(engine),
        states=_states(engine) if keep_states else None,
        traffic=traffic.summary(config.rounds),
    )


def run_traffic(config: SimConfig, model: torch.nn.Module, *, width: int) -> Traffic:
    """The byte count of a run: ``width`` shared parameters per node, as the wire sends them."""
    return Traffic(
        num_nodes=config.data.num_nodes,
        num_values=width,
        full_bytes=len(encode_state(model.state_dict())),
        compression=Compression.parse(config.compression),
    )


def loop_backend(
    model: torch.nn.Module, config: SimConfig, task: Task | None = None
) -> ModuleLoopBackend:
    """The per-node backend for ``model`` (a task's loss, optimizer, step and buffer policy)."""
    train = config.train

    def optimizer(parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if task is None:
            return make_optimizer(parameters, train)
        return task.make_optimizer(parameters, train)

    return ModuleLoopBackend(
        model,
        layout=StateLayout(model, buffers="average" if task is None else task.buffers),
        num_nodes=config.data.num_nodes,
        make_optimizer=optimizer,
        loss=None if task is None else task.loss_fn,
        step=None if task is None else task.step_fn,  # type: ignore[arg-type]
        lr_schedule=train.lr_schedule,
    )


def engine_path(engine: Engine) -> str:
    """How the engine trained: ``linear`` or ``vectorized`` (stacked rows), or ``loop``."""
    if isinstance(engine.backend, ModuleLoopBackend):
        return "loop"
    return "linear" if isinstance(engine.backend, LinearBackend) else "vectorized"


def _states(engine: Engine) -> list[dict[str, torch.Tensor]]:
    return [engine.node_state(node) for node in range(engine.num_nodes)]


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
    rules = ("learned", "fedfomo")
    return config.mixing.rule in rules and config.data.num_nodes <= TRUST_SNAPSHOT_NODES


def _label_mix(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> torch.Tensor:
    """``(N, C)`` each node's training label distribution."""
    rows = [np.bincount(labels[p], minlength=num_classes) / max(1, len(p)) for p in parts]
    return torch.from_numpy(np.stack(rows))


def _curve_subset(
    config: SimConfig, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if config.eval_examples is None or config.eval_examples >= len(y):
        return None, None
    generator = torch.Generator().manual_seed(derive_seed(config.seed, Stream.CURVES))
    pick = torch.randperm(len(y), generator=generator)[: config.eval_examples]
    return x[pick], y[pick]


class OwnTest:
    """Each node's own-distribution accuracy on a set of test examples (see the module doc).

    Built once per run and set of examples (``x``, ``y``; None: the whole test set of ``data``):
    for ``rotated`` the rotated copies are made here, once. ``label_swap`` needs no copies: the
    inputs are the same, so a node's own accuracy is read off the confusion matrix of the
    untransformed evaluation, with each true class mapped through its cluster's permutation.
    """

    def __init__(
        self,
        label_mix: torch.Tensor,
        clusters: Clusters | None,
        x: torch.Tensor | None,
        y: torch.Tensor | None,
        data: NodeData,
    ) -> None:
        self.label_mix, self.clusters = label_mix, clusters
        self.views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if clusters is not None and clusters.split == "rotated":
            x_all = (data.x_test if x is None else x).numpy()
            y_all = data.y_test if y is None else y
            for cluster in range(1, clusters.num_clusters):
                rotated, _ = clusters.transform(cluster, x_all, y_all.numpy())
                self.views[cluster] = torch.from_numpy(rotated), y_all

    def accuracy(self, engine: Engine, evaluation: Evaluation) -> torch.Tensor:
        """``(N,)`` float64, given ``evaluation``: every node on the untransformed examples."""
        clusters = self.clusters
        if clusters is None:
            return evaluation.weighted_accuracy(self.label_mix)
        own = evaluation.accuracy.clone()  # cluster 0 sees the test set as it is
        classes = torch.arange(evaluation.confusion.shape[1])
        for cluster in range(1, clusters.num_clusters):
            rows = torch.from_numpy(clusters.members(cluster))
            if cluster in self.views:
                own[rows] = engine.evaluate(*self.views[cluster]).accuracy[rows]
                continue
            confusion = evaluation.confusion[rows]  # [node, true class, guess]
            relabelled = torch.from_numpy(clusters.permutations[cluster])
            hits = confusion[:, classes, relabelled].sum(dim=1).to(torch.float64)
            own[rows] = hits / confusion.sum(dim=(1, 2)).clamp_min(1)
        return own


def _cluster_share(weights: torch.Tensor | None, clusters: Clusters | None) -> list[float] | None:
    """Per node, the sum of its mixing weights on nodes of its own cluster (itself included).

    None without clusters or weights (robust rules).
    """
    if clusters is None or weights is None:
        return None
    same = torch.from_numpy(clusters.same_cluster())
    return [float(v) for v in (weights * same).sum(dim=1)]


def _final_scores(
    engine: Engine, own_test: OwnTest, train_counts: list[int]
) -> list[dict[str, Any]]:
    from fedtorrent.training.evaluate import classification_metrics  # noqa: PLC0415

    evaluation = engine.evaluate(keep_predictions=True)
    assert evaluation.predictions is not None
    own = own_test.accuracy(engine, evaluation).tolist()
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


def _mean_traffic(runs: Sequence[RunOutcome]) -> dict[str, Any] | None:
    """The runs' traffic, numbers (and lists of numbers, item by item) averaged over runs.

    None when no run counted any.
    """
    counted = [r.traffic for r in runs if r.traffic is not None]
    if not counted:
        return None
    out: dict[str, Any] = dict(counted[0])
    for key, value in counted[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(np.mean([float(t[key]) for t in counted]))
        elif isinstance(value, list):
            out[key] = [float(v) for v in np.mean([t[key] for t in counted], axis=0)]
    return out


def summarize(outcomes: Sequence[RunOutcome]) -> dict[str, Any]:
    """Mean and std of final scores per mixing rule, over nodes and seeds.

    With a clustered split, ``cluster_share_mean`` (and ``_std``) is the last round's share of
    each node's mixing weight inside its true cluster, over nodes and seeds (weighted rules).

    ``accuracy_std`` pools every (seed, node) pair; ``accuracy_std_nodes`` is the mean over seeds
    of the std across nodes; ``accuracy_std_seeds`` the std over seeds of the node mean, and
    ``accuracy_per_seed`` that node mean run by run (``seeds`` says which), for paired comparisons.
    """
    by_rule: dict[str, list[RunOutcome]] = {}
    for outcome in outcomes:
        by_rule.setdefault(outcome.config.mixing.rule, []).append(outcome)
    summary: dict[str, Any] = {}
    for rule, runs in by_rule.items():
        common = {
            "runs": len(runs),
            "seeds": [r.config.seed for r in runs],
            "engine_path": runs[0].engine_path,
            "metrics": metric_stats(runs),
            "traffic": _mean_traffic(runs),
        }
        if "accuracy" not in runs[0].final[0] or "own_accuracy" not in runs[0].final[0]:
            summary[rule] = {
                **common,
                "split": runs[0].final[0].get("split"),
                "rejected": _sum_counts(r.rejected for r in runs),
                "wall_seconds": float(sum(r.wall_seconds for r in runs)),
                "timings": _sum_timings(runs),
            }
            continue
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
            **_cluster_share_stats(runs),
            "f1_mean": float(f1.mean()),
            "rejected": _sum_counts(r.rejected for r in runs),
            "wall_seconds": float(sum(r.wall_seconds for r in runs)),
            "timings": _sum_timings(runs),
            "engine_path": common["engine_path"],
            "metrics": common["metrics"],
            "traffic": common["traffic"],
        }
        secured = [r.security for r in runs if r.security is not None]
        if secured:
            summary[rule]["security"] = _pool_security(secured)
    return summary


def _cluster_share_stats(runs: Sequence[RunOutcome]) -> dict[str, float]:
    """``cluster_share_mean`` / ``_std`` over nodes and seeds of the last round's share, if any."""
    if "cluster_share" not in runs[0].final[0]:
        return {}
    shares = np.array([[float(x["cluster_share"]) for x in r.final] for r in runs])
    return {"cluster_share_mean": float(shares.mean()), "cluster_share_std": float(shares.std())}


def metric_stats(runs: Sequence[RunOutcome]) -> dict[str, dict[str, float]]:
    """``{name: {"mean", "std"}}`` across nodes and seeds of every final score (``loss`` too).

    Scores are the numeric entries of the final records, bar bookkeeping (``train_examples``,
    ``own_accuracy``, ``confusion``).
    """
    skip = {"train_examples", "own_accuracy", "cluster_share", "confusion", "split", "num_examples"}
    names = [k for k, v in runs[0].final[0].items() if k not in skip and isinstance(v, int | float)]
    out = {}
    for name in names:
        values = np.array([float(r[name]) for run in runs for r in run.final], dtype=np.float64)
        out[name] = {"mean": float(values.mean()), "std": float(values.std())}
    return out


def _sum_timings(runs: Sequence[RunOutcome]) -> dict[str, float]:
    return {phase: float(sum(r.timings[phase] for r in runs)) for phase in runs[0].timings}


def _pool_security(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Security metrics of several seeds: means (std of the honest accuracy over all seeds).

    ``weight_to_attackers_per_round`` is each round's mean over the seeds that had a value;
    ``rounds_to_exclusion`` the mean over seeds that excluded the attackers (each seed's value,
    None where it never did, in ``rounds_to_exclusion_per_seed``).
    """

    def mean(key: str) -> float | None:
        values = [float(p[key]) for p in parts if p.get(key) is not None]
        return sum(values) / len(values) if values else None

    rejected = _sum_counts(p["rejected"] for p in parts)
    rounds = zip(*(p["weight_to_attackers_per_round"] for p in parts), strict=True)
    per_round = [[v for v in values if v is not None] for values in rounds]
    return {
        "attackers": parts[0]["attackers"],
        "honest_accuracy_mean": mean("honest_accuracy_mean"),
        "honest_accuracy_std": mean("honest_accuracy_std"),
        "honest_accuracy_std_seeds": float(np.std([p["honest_accuracy_mean"] for p in parts])),
        "attacker_accuracy_mean": mean("attacker_accuracy_mean"),
        "weight_to_attackers": mean("weight_to_attackers"),
        "weight_to_attackers_per_round": [sum(v) / len(v) if v else None for v in per_round],
        "attack_from": parts[0]["attack_from"],
        "rounds_to_exclusion": mean("rounds_to_exclusion"),
        "rounds_to_exclusion_per_seed": [p.get("rounds_to_exclusion") for p in parts],
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
    configs: Sequence[SimConfig] | SimConfig = (),
    *,
    out_dir: Path | None = None,
    dataset: Dataset | None = None,
    task: Task | None = None,
    on_round: Callable[[SimConfig, int, int], None] | None = None,
    share: ShareFn | None = None,
    plots: bool = True,
    save_models: bool = False,
    keep_states: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[list[RunOutcome], dict[str, Any]]:
    """Run several configurations (rules, seeds) of one dataset or one task into one run folder.

    Args:
        configs: the runs (one config alone is fine; with ``task`` and none, ``SimConfig()``).
            Without ``task`` they must all use the same dataset.
        out_dir: the run folder (created; records are appended); None writes nothing.
        dataset: the loaded dataset, else it is loaded from ``configs[0]``.
        task: a :class:`~fedtorrent.task.Task` to run instead of the configs' dataset and model:
            node i's data is ``task.node_data(i, num_nodes)``; only ``num_nodes`` of
            ``config.data`` is used. A built-in task (``builtin_task``) with no other part set
            runs the built-in fast path with its dataset and model. The task is checked first
            (:func:`~fedtorrent.task.check_task`).
        on_round: called after every round with ``(config, rounds done, rounds)``, besides the
            progress bar.
        share: passed to every run (see :data:`ShareFn`).
        plots: draw the plots into ``out_dir/plots`` at the end (built-in runs).
        save_models: write every node's final state to
            ``out_dir/models/<rule>-seed<seed>/node-<i>.safetensors`` (``RunOutcome.model_paths``).
        keep_states: return every node's final state dict in ``RunOutcome.states``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or a ``torch.device``: where
            every run trains, mixes and evaluates (:func:`fedtorrent.device.resolve_device`;
            an absent device is a ``ConfigError``). Not a setting of the configs: the summary
            and records are the same whatever the device, up to float rounding.
        progress: show a bar of rounds done over every config on stderr, in a terminal or a
            notebook only (:func:`fedtorrent.progress.progress_bar`); False shows nothing.

    Returns:
        The outcomes in order, and the summary also written to ``summary.json``: per mixing rule,
        ``metrics`` holds ``{name: {"mean", "std"}}`` across nodes (and seeds) for the test loss
        and every metric, and ``engine_path`` how nodes trained.
    """
    where = device if isinstance(device, torch.device) else resolve_device(device)
    configs = [configs] if isinstance(configs, SimConfig) else list(configs)
    if not configs and task is not None:
        configs = [SimConfig()]
    if not configs:
        raise ConfigError("nothing to simulate: no configurations")
    for config in configs:  # a bad spec is one line before any data is loaded
        Compression.parse(config.compression)
    if task is not None:
        builtin = _builtin_configs(task, configs)
        if builtin is not None:
            configs, task = builtin, None
        elif any(c.data.split in CLUSTERED_SPLITS for c in configs):
            from fedtorrent.data.clusters import TASK_CLUSTERS  # noqa: PLC0415

            raise ConfigError(TASK_CLUSTERS)
    if task is None:
        names = {c.data.dataset for c in configs}
        if len(names) != 1:
            raise ConfigError(f"one run folder holds one dataset, got {sorted(names)}")
        dataset = dataset or load_for(configs[0])
        final_fields: Sequence[str] = FINAL_FIELDS
        round_fields: Sequence[str] = ROUND_FIELDS
    else:
        from fedtorrent.task import check_task  # noqa: PLC0415

        for n in sorted({c.data.num_nodes for c in configs}):
            report = check_task(task, node=0, num_nodes=n, train=configs[0].train)
        names_ = ["loss", *report.metrics]
        final_fields = ("mixing", "seed", "node", "split", *names_, "train_examples")
        round_fields = (
            "mixing", "seed", "round", "node", "test_loss",
            *(f"test_{m}" for m in report.metrics), "self_weight",
        )  # fmt: skip
    outcomes: list[RunOutcome] = []
    with ExitStack() as stack:
        advance = stack.enter_context(
            progress_bar("simulating", total=sum(c.rounds for c in configs), enabled=progress)
        )
        writers = RunWriters()
        if out_dir is not None:
            writers = RunWriters(
                rounds=stack.enter_context(
                    RecordWriter(out_dir, name="rounds", fields=round_fields)
                ),
                final=stack.enter_context(RecordWriter(out_dir, name="final", fields=final_fields)),
                trust=stack.enter_context(
                    RecordWriter(out_dir, name="trust", fields=("mixing", "seed", "round"))
                ),
            )
        rounds_before = 0
        for config in configs:
            callback = functools.partial(
                _round_done, config, on_round=on_round, advance=advance, before=rounds_before
            )
            rounds_before += config.rounds
            keep = keep_states or (save_models and out_dir is not None)
            if task is None:
                assert dataset is not None
                outcome = run_one(
                    config,
                    dataset=dataset,
                    on_round=callback,
                    share=share,
                    writers=writers,
                    keep_states=keep,
                    device=where,
                )
            else:
                from fedtorrent.sim.tasks import run_task  # noqa: PLC0415

                outcome = run_task(
                    config,
                    task,
                    on_round=callback,
                    share=share,
                    writers=writers,
                    keep_states=keep,
                    device=where,
                )
            if save_models and out_dir is not None:
                outcome = _save_models(outcome, out_dir, keep=keep_states)
            outcomes.append(outcome)
    summary: dict[str, Any] = {
        "by_mixing": summarize(outcomes),
        "configs": [config_dict(c) for c in configs],
    }
    if out_dir is not None:
        write_json(out_dir / "summary.json", summary)
        if plots and task is None:
            from fedtorrent.metrics.plots import plot_run_folder  # noqa: PLC0415

            plot_run_folder(out_dir)
    return outcomes, summary


def _round_done(
    config: SimConfig,
    done: int,
    rounds: int,
    *,
    on_round: Callable[[SimConfig, int, int], None] | None,
    advance: Advance,
    before: int,
) -> None:
    """Move the bar to round ``done`` of ``config`` (``before`` rounds precede it); ``on_round``."""
    advance(before + done, description=f"{config.mixing.rule} seed {config.seed} round {done}")
    if on_round is not None:
        on_round(config, done, rounds)


def _builtin_configs(task: Task, configs: Sequence[SimConfig]) -> list[SimConfig] | None:
    """The configs that run a plain built-in task on the fast path; None for any other task."""
    from fedtorrent.task import BuiltinData, BuiltinModel  # noqa: PLC0415

    plain = (
        task.loss is None
        and task.metrics is None
        and task.optimizer is None
        and task.train_step is None
        and task.buffers == "average"
    )
    if not (plain and isinstance(task.model, BuiltinModel) and isinstance(task.data, BuiltinData)):
        return None
    model, data = task.model.config, task.data.config
    return [
        dataclasses.replace(
            c, model=model, data=dataclasses.replace(data, num_nodes=c.data.num_nodes)
        )
        for c in configs
    ]


def _save_models(outcome: RunOutcome, out_dir: Path, *, keep: bool) -> RunOutcome:
    """Write each node's final state (safetensors) under ``out_dir/models``; drop the states."""
    assert outcome.states is not None
    folder = out_dir / "models" / f"{outcome.config.mixing.rule}-seed{outcome.config.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [
        write_atomic(folder / f"node-{i}.safetensors", encode_state(state))
        for i, state in enumerate(outcome.states)
    ]
    return dataclasses.replace(outcome, model_paths=paths, states=outcome.states if keep else None)
