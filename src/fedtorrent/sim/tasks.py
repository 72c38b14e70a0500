"""Simulate any :class:`~fedtorrent.task.Task`: its data per node, its model, loss and metrics.

Node i's examples are ``task.node_data(i, N)``. Every node's ``train`` and ``val`` rows are
stacked into one tensor that the engine indexes (as it does a built-in dataset), so batch order,
trust batches and mixing are the engine's own. Training takes one of two paths, chosen by
:func:`choose_path` and reported as ``engine_path``:

- ``vectorized``: every node's parameters as one ``(N, P)`` tensor through ``torch.func``
  (``FunctionalBackend``), when the task uses the default step and optimizer, its splits are
  tensors, its model has no buffers, and a probe of the stacked forward and loss succeeds;
- ``loop``: one real ``nn.Module`` loaded with each node's state in turn, the task's optimizer and
  ``train_step`` (``ModuleLoopBackend``); BatchNorm statistics move and are shared by the
  task's ``buffers`` policy.

Both draw the same batches, so on a task both can run they give the same numbers (up to float
rounding; dropout masks differ). Evaluation runs each node's model on its whole split at once
(``test``; ``val`` when some node has no ``test``; else ``train``): the task's loss and one call
of its metrics per node and split.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fedtorrent.config import SimConfig
from fedtorrent.errors import ConfigError, DataError
from fedtorrent.mixing.trust import private_trust
from fedtorrent.sim.engine import Engine, FunctionalBackend, NodeData, ShareFn
from fedtorrent.sim.loop import has_buffers
from fedtorrent.sim.topology import Topology
from fedtorrent.training.schedule import round_lr_scale
from fedtorrent.training.seeds import Stream, derive_seed

if TYPE_CHECKING:
    from fedtorrent.sim.run import RunOutcome, RunWriters
    from fedtorrent.task import NodeData as TaskData
    from fedtorrent.task import Task

EVAL_CHUNK = 1024
"""Examples one evaluation forward pass takes."""


def choose_path(task: Task, model: nn.Module, nodes: Sequence[TaskData]) -> str:
    """``vectorized`` when the task can run as stacked rows (see the module doc), else ``loop``."""
    if task.train_step is not None or task.optimizer is not None or has_buffers(model):
        return "loop"
    if any(not isinstance(d.split(name), tuple | None) for d in nodes for name in SPLITS):
        return "loop"
    like = {k: v.detach().clone() for k, v in model.state_dict().items()}
    backend = FunctionalBackend(model, like, loss=task.loss_fn)
    x, y = nodes[0].take("train", range(min(4, nodes[0].size("train"))))
    rows = torch.stack([_flat(like)] * 2)
    try:  # vmap refuses some models (data-dependent control flow, .item(), in-place on inputs)
        backend.grad(rows, torch.stack([x, x]), torch.stack([y, y]), None)
        backend.losses(rows, torch.stack([x, x]), torch.stack([y, y]))
    except Exception:  # any failure of the probe means the plain loop, which runs anything
        return "loop"
    return "vectorized"


SPLITS = ("train", "val", "test")


def _flat(state: dict[str, Tensor]) -> Tensor:
    return torch.cat([state[k].reshape(-1).to(torch.float32) for k in sorted(state)])


def stack_nodes(nodes: Sequence[TaskData]) -> NodeData:
    """Every node's train and val rows in one tensor, with each node's indices into it.

    Raises:
        DataError: nodes whose examples differ in shape or dtype.
    """
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    train_parts: list[Tensor] = []
    val_parts: list[Tensor] = []
    start = 0
    for node, data in enumerate(nodes):
        for name, parts in (("train", train_parts), ("val", val_parts)):
            if data.size(name) == 0:
                parts.append(torch.zeros(0, dtype=torch.int64))
                continue
            x, y = data.tensors(name)
            if xs and (x.shape[1:] != xs[0].shape[1:] or x.dtype != xs[0].dtype):
                raise DataError(
                    f"node {node}'s {name} x is {tuple(x.shape[1:])} {x.dtype}, node 0's "
                    f"{tuple(xs[0].shape[1:])} {xs[0].dtype}: every node needs the same kind"
                )
            if ys and (y.shape[1:] != ys[0].shape[1:] or y.dtype != ys[0].dtype):
                raise DataError(f"node {node}'s {name} y differs in shape or dtype from node 0's")
            xs.append(x)
            ys.append(y)
            parts.append(torch.arange(start, start + len(x)))
            start += len(x)
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    return NodeData(
        x_train=x_all,
        y_train=y_all,
        train_index=_pad(train_parts),
        train_count=torch.tensor([len(p) for p in train_parts], dtype=torch.int64),
        val_index=_pad(val_parts),
        val_count=torch.tensor([len(p) for p in val_parts], dtype=torch.int64),
        x_test=x_all[:0],
        y_test=y_all[:0],
        num_classes=0,
    )


def _pad(parts: list[Tensor]) -> Tensor:
    width = max(1, *(len(p) for p in parts))
    out = torch.zeros(len(parts), width, dtype=torch.int64)
    for row, part in enumerate(parts):
        out[row, : len(part)] = part
    return out


def eval_split(nodes: Sequence[TaskData]) -> str:
    """The split every node is scored on: ``test`` if all have one, else ``val``, else ``train``."""
    for name in ("test", "val"):
        if all(d.size(name) > 0 for d in nodes):
            return name
    return "train"


def score(
    task: Task, model: nn.Module, state: dict[str, Tensor], data: TaskData, split: str
) -> dict[str, float]:
    """``{"loss": ..., **metrics}`` of ``state`` on the whole ``split`` of one node's data."""
    from fedtorrent.task.contract import call_user, callable_name  # noqa: PLC0415

    model.load_state_dict(state)  # copies into the model's own device
    model.eval()
    on = next((p.device for p in model.parameters()), torch.device("cpu"))
    outputs, targets = [], []
    with torch.no_grad():
        for begin in range(0, data.size(split), EVAL_CHUNK):
            x, y = data.take(split, range(begin, min(begin + EVAL_CHUNK, data.size(split))))
            outputs.append(model(x.to(on)).cpu())
            targets.append(y)
        output, target = torch.cat(outputs), torch.cat(targets)
        loss = float(task.loss_fn(output, target))
    where = f"Task.metrics {callable_name(task.metrics_fn)}"
    metrics = call_user(where, task.metrics_fn, output, target, error=ConfigError)
    return {"loss": loss, **{str(k): float(v) for k, v in metrics.items()}}


def run_task(
    config: SimConfig,
    task: Task,
    *,
    on_round: Callable[[int, int], None] | None = None,
    share: ShareFn | None = None,
    writers: RunWriters | None = None,
    keep_states: bool = False,
    path: str | None = None,
    device: torch.device | str = "cpu",
) -> RunOutcome:
    """Run ``task`` with ``config``'s nodes, rounds, training, mixing and topology (one seed).

    ``config.data`` gives only ``num_nodes``; ``config.model`` is unused. ``path`` forces
    ``vectorized`` or ``loop`` (None: :func:`choose_path`). Records go to ``writers`` as in
    :func:`fedtorrent.sim.run.run_one`, with the task's metrics as columns. ``device`` is
    where the engine and the scoring model run; scores and states come back on the CPU.

    Raises:
        ConfigError: an attack (not simulated for tasks yet), a forced path the task cannot take,
            or learned trust without validation data on every node.
        DataError: node data that does not fit together.
    """
    from fedtorrent.sim import scenario  # noqa: PLC0415
    from fedtorrent.sim.run import (  # noqa: PLC0415
        RunOutcome,
        RunWriters,
        engine_rejections,
        loop_backend,
        run_traffic,
    )

    if config.attack is not None:
        raise ConfigError("attacks are simulated for the built-in datasets only, not for a task")
    started = time.perf_counter()
    n = config.data.num_nodes
    nodes = [task.node_data(i, n) for i in range(n)]
    model = task.make_model(seed=derive_seed(config.seed, Stream.INIT))
    privacies = scenario.example_privacies(
        config, [d.size("train") for d in nodes], [d.size("val") for d in nodes]
    )
    if privacies is not None and task.train_step is not None:
        raise ConfigError(
            "example-level DP cannot run a task's own train_step: it clips every example's "
            "gradient itself (drop train_step, or use unit 'node')"
        )
    # Example-level DP trains node by node (per-example gradients through torch.func).
    chosen = "loop" if privacies is not None else choose_path(task, model, nodes)
    if path == "vectorized" and chosen != "vectorized":
        raise ConfigError(
            "this task cannot take the vectorized path (it needs the default step and "
            "optimizer, tensors, a model without buffers that torch.func can batch)"
        )
    chosen = path or chosen
    if chosen == "loop":
        backend: Any = loop_backend(model, config, task)
        init = backend.layout.flatten(model.state_dict())
    else:
        like = {k: v.detach().clone() for k, v in model.state_dict().items()}
        backend = FunctionalBackend(model, like, loss=task.loss_fn)
        init = _flat(like)
    outgoing: scenario.Outgoing | None = None
    width = init.shape[0] if chosen != "loop" else backend.layout.num_params
    if (config.privacy is not None and config.privacy.update_level) or (
        config.compression != "none"
    ):
        if share is not None:
            raise ConfigError("give a share hook or a config with privacy/compression, not both")
        outgoing = share = scenario.Outgoing(config, initial=init[:width])
    engine = Engine(
        backend=backend,
        data=stack_nodes(nodes),
        train=config.train,
        mixing=config.mixing,
        topology=Topology(
            config.topology, num_nodes=n, seed=config.seed, explore=config.mixing.trust_cohorts
        ),
        init=init,
        seed=config.seed,
        share=share,
        device=device,
        dp=None if privacies is None else [p.dp for p in privacies],
        trust_dp=private_trust(config.privacy, config.mixing),
    )
    traffic = run_traffic(config, model, width=width)
    split = eval_split(nodes)
    scorer = task.make_model(seed=0).to(device)
    tag = {"mixing": config.mixing.rule, "seed": config.seed}
    writers = writers or RunWriters()
    weights: Tensor | None = None
    scores: list[dict[str, float]] = []
    for round_index in range(config.rounds):
        scale = round_lr_scale(config.round_schedule, round_index, config.rounds)
        weights = engine.run_round(round_index, lr_scale=scale)
        scenario.charge_round(privacies, engine.releases)
        traffic.record(engine.topology.cohorts(round_index), round_index)
        done = round_index + 1
        epsilon = scenario.round_epsilons(outgoing, privacies, n)
        if done % config.eval_every == 0 or done == config.rounds:
            scores = [score(task, scorer, engine.node_state(i), nodes[i], split) for i in range(n)]
            if writers.rounds is not None:
                for node, values in enumerate(scores):
                    self_weight = float(weights[node, node]) if weights is not None else math.nan
                    writers.rounds.write(
                        {
                            **tag,
                            "round": done,
                            "node": node,
                            "test_loss": values["loss"],
                            **{f"test_{k}": v for k, v in values.items() if k != "loss"},
                            "self_weight": self_weight,
                            **({} if epsilon is None else {"epsilon": epsilon[node]}),
                        }
                    )
        if on_round is not None:
            on_round(done, config.rounds)
    counts = engine.data.train_count.tolist()
    final = [
        {"split": split, **values, "train_examples": counts[i]} for i, values in enumerate(scores)
    ]
    if writers.final is not None:
        for node, record in enumerate(final):
            writers.final.write({**tag, "node": node, **record})
    return RunOutcome(
        config=config,
        final=final,
        weights=None if weights is None else weights.tolist(),
        timings=engine.timings.as_dict(),
        wall_seconds=time.perf_counter() - started,
        rejected=engine_rejections(engine),
        engine_path=chosen,
        states=[engine.node_state(i) for i in range(n)] if keep_states else None,
        traffic=traffic.summary(config.rounds),
    )
