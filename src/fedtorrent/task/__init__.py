"""Bring your own task: the contract (model, data, loss, metrics), its loader, checks and built-ins.

See docs/tasks.md. ``fedtorrent.Task``, ``NodeData``, ``builtin_task`` and ``load_task`` are
the public names; the rest is for drivers (the simulator and peers).
"""

from fedtorrent.state.schema import BUFFER_POLICIES
from fedtorrent.task.builtin import BuiltinData, BuiltinModel, builtin_task, builtin_task_from
from fedtorrent.task.check import TaskReport, check_task
from fedtorrent.task.contract import (
    NodeData,
    Task,
    TrainContext,
    cross_entropy_metrics,
    default_train_step,
)
from fedtorrent.task.loader import load_task, task_spec

__all__ = [
    "BUFFER_POLICIES",
    "BuiltinData",
    "BuiltinModel",
    "NodeData",
    "Task",
    "TaskReport",
    "TrainContext",
    "builtin_task",
    "builtin_task_from",
    "check_task",
    "cross_entropy_metrics",
    "default_train_step",
    "load_task",
    "task_spec",
]
