"""Make a session from Python: its settings and initial state, then the torrent files on disk.

``fedtorrent create`` is a thin wrapper around these two calls::

    session, state = create_session(task=task, data=DataConfig(num_nodes=3), rounds=20)
    torrent = write_session("run/session.torrent", session, state,
                            tracker="http://127.0.0.1:6969/announce")

:func:`create_session` builds the initial model (a built-in one from the registry, or the task's,
seeded from ``train.seed``) and encodes its state; :func:`write_session` writes the torrent and the
state beside it (``<path>.state``). A torrent holds settings, a state schema and a label, never
code: every peer brings the task itself.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fedtorrent.config import (
    CLUSTERED_SPLITS,
    DataConfig,
    MixingConfig,
    ModelConfig,
    PrivacyConfig,
    SimConfig,
    TrainConfig,
)
from fedtorrent.data.clusters import TASK_CLUSTERS
from fedtorrent.data.datasets import CLASSES, INPUT_SHAPES
from fedtorrent.errors import ConfigError
from fedtorrent.models import build_model
from fedtorrent.net.torrent import (
    MAX_TASK_LABEL_CHARS,
    TASK_MODEL,
    Session,
    TaskInfo,
    Torrent,
    save_session,
)
from fedtorrent.state import encode_state, state_digest
from fedtorrent.state.compress import Compression
from fedtorrent.state.schema import state_schema
from fedtorrent.task import Task, check_task, load_task, task_spec
from fedtorrent.training.seeds import Stream, derive_seed

_SIM = SimConfig()
DEFAULT_COHORT = 3
"""Peers each peer mixes with per round, unless told otherwise."""


def create_session(
    *,
    task: Task | str | None = None,
    model: ModelConfig | None = None,
    data: DataConfig | None = None,
    train: TrainConfig | None = None,
    mixing: MixingConfig | None = None,
    rounds: int = _SIM.rounds,
    round_schedule: str = _SIM.round_schedule,
    cohort_size: int = DEFAULT_COHORT,
    privacy: PrivacyConfig | None = None,
    compression: str = "none",
    allow_keys: Sequence[str] = (),
    name: str | None = None,
) -> tuple[Session, bytes]:
    """A session and its initial state (safetensors bytes), as ``fedtorrent create`` makes them.

    Args:
        task: the user's task (a :class:`~fedtorrent.task.Task`, or a spec ``PATH.py:NAME`` /
            ``package.module:NAME`` that is loaded). It is checked on node 0 of
            ``data.num_nodes`` (:func:`~fedtorrent.task.check_task`); its model, seeded from
            ``train.seed`` as the simulator seeds its initial model, gives the initial state and
            the state schema; the label is the spec's (``mytask:task``), else ``task``. None: a
            built-in session.
        model: the built-in model (registry name and arguments); default ``logreg``. Not with
            ``task``.
        data: the dataset (built-in sessions) and how many nodes the swarm has (``num_nodes``);
            with a task only ``num_nodes``, ``split`` settings and ``seed`` are kept, and the
            dataset is the task placeholder. Default ``DataConfig()``.
        train: local training (epochs or steps, batch size, optimizer, seed of the initial
            weights and of training); default ``SimConfig().train``, the simulator's.
        mixing: the mixing rule and its settings; default ``MixingConfig()`` (learned trust).
        rounds: learning rounds.
        round_schedule: the local learning rate across rounds, ``constant`` or ``cosine``.
        cohort_size: peers each peer mixes with per round.
        privacy: differential privacy of what peers share; None shares without noise.
        compression: what peers send each other (``state.compress``: ``none``, ``int8``,
            ``topk:0.1,int8`` ...), kept in the torrent as ``{"codec": canonical spelling}``;
            ``none`` leaves the key out (the info-hash of such a session is unchanged).
        allow_keys: Ed25519 public keys (hex) of the only peers a closed swarm admits; empty:
            open.
        name: the session name; default ``<dataset>-<model>-<split>-<nodes>`` or
            ``task-<label>-<nodes>``.

    Raises:
        ConfigError: an unknown dataset or model, ``model`` with ``task``, a task that does not
            load or check, or settings a session refuses (each one line).
        DataError: the task's data fails its checks on node 0.
    """
    data = data or DataConfig()
    train = train or _SIM.train
    task_info: TaskInfo | None = None
    if task is not None:
        if model is not None:
            raise ConfigError("a task session takes its model from the task: give task or model")
        if data.split in CLUSTERED_SPLITS:
            raise ConfigError(TASK_CLUSTERS)
        net, task_info = _task_model(task, train=train, nodes=data.num_nodes)
        model = ModelConfig(TASK_MODEL, {})
        data = dataclasses.replace(data, dataset=TASK_MODEL, data_dir=None)
    else:
        model = model or ModelConfig()
        if data.dataset not in INPUT_SHAPES:
            raise ConfigError(
                f"dataset must be one of {', '.join(INPUT_SHAPES)}; got {data.dataset!r}"
            )
        data = dataclasses.replace(data, data_dir=None)  # where files live is each peer's own
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(train.seed, Stream.INIT))  # the simulator's initial model
            net = build_model(
                model.name,
                input_shape=INPUT_SHAPES[data.dataset],
                num_classes=len(CLASSES[data.dataset]),
                **model.kwargs,
            )
    state = encode_state(net.state_dict())
    if name is None:
        name = f"{data.dataset}-{model.name}-{data.split}-{data.num_nodes}"
        if task_info is not None:
            name = f"task-{task_info.label}-{data.num_nodes}"
    session = Session(
        name=name,
        model=model,
        data=data,
        train=train,
        mixing=mixing or MixingConfig(),
        rounds=rounds,
        round_schedule=round_schedule,
        cohort_size=cohort_size,
        state_sha256=state_digest(state),
        state_size=len(state),
        privacy=privacy,
        compression=session_compression(compression),
        allow_keys=tuple(sorted({key.strip().lower() for key in allow_keys})),
        task=task_info,
    )
    return session, state


def write_session(
    path: str | Path,
    session: Session,
    state: bytes,
    *,
    tracker: str,
    comment: str | None = None,
) -> Torrent:
    """Write the torrent for ``session`` at ``path`` and its initial ``state`` beside it.

    ``tracker`` is the announce URL peers use by default. The state (``<path>.state``) is
    written first and both atomically (:func:`~fedtorrent.net.torrent.save_session`), so an
    interrupted call leaves no torrent without its state; missing folders are made. Returns the
    torrent (``torrent.info_hash`` is the session id).

    Raises:
        TorrentError, ConfigError: the torrent would not read back (a bad URL, for example).
        OSError: a file cannot be written.
    """
    torrent = Torrent(
        announce=tracker,
        session=session,
        creation_date=int(time.time()),
        created_by="fedtorrent",
        comment=comment,
    )
    save_session(torrent, path, state)
    return torrent


def task_label(spec: str) -> str:
    """The label a torrent gives the task of ``spec``: ``mytask:task`` for ``dir/mytask.py:task``.

    Non-printable characters become ``?``; the label is clipped to the torrent's limit.
    """
    source, _, name = spec.rpartition(":")
    label = f"{Path(source).stem if source.endswith('.py') else source}:{name}"
    return "".join(c if c.isprintable() else "?" for c in label)[:MAX_TASK_LABEL_CHARS]


def _task_model(task: Task | str, *, train: TrainConfig, nodes: int) -> tuple[nn.Module, TaskInfo]:
    """The task's initial model (seeded from ``train.seed``) and the torrent's :class:`TaskInfo`.

    The task is checked on node 0 of ``nodes`` first (``check_task``), so a task that cannot
    train fails here, once, rather than in every peer.
    """
    if isinstance(task, str):
        spec: str | None = task
        task = load_task(task)
    elif isinstance(task, Task):
        try:
            spec = task_spec(task)
        except ConfigError:  # a task made in a notebook: peers will bring it by a spec anyway
            spec = None
    else:
        raise ConfigError(f"task must be a fedtorrent.Task or a spec, got {type(task).__name__}")
    check_task(task, node=0, num_nodes=nodes, train=train)
    net = task.make_model(
        seed=derive_seed(train.seed, Stream.INIT)
    )  # the simulator's initial model
    label = TASK_MODEL if spec is None else task_label(spec)
    return net, TaskInfo(label=label, schema=state_schema(net, buffers=task.buffers))


def session_compression(text: str) -> dict[str, str] | None:
    """The torrent's ``compression`` entry for a spec (None for ``none``); ConfigError if bad."""
    spec = Compression.parse(text)
    return None if spec.is_none else {"codec": str(spec)}
