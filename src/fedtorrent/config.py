"""Frozen, validated settings for every part of fedtorrent; passed down explicitly, never global.

Each dataclass checks itself in ``__post_init__`` and raises ``ConfigError`` naming the field, so a
bad value fails where it is written, not deep inside a training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtorrent.errors import ConfigError

SPLITS = ("iid", "noniid", "shards", "unbalanced")
"""iid balanced; label skew by Dirichlet(alpha); label skew by k classes per node; quantity skew."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where its files are, and how it is split across nodes."""

    dataset: str = "mnist"
    data_dir: Path | None = None
    num_nodes: int = 6
    split: str = "iid"
    alpha: float = 0.5
    """Dirichlet concentration: label skew for ``noniid``, size skew for ``unbalanced``."""
    classes_per_node: int = 2
    """For ``shards``: how many classes each node sees."""
    min_per_node: int = 10
    """For ``unbalanced``: the fewest examples any node gets."""
    val_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.num_nodes >= 1, f"num_nodes must be >= 1, got {self.num_nodes}")
        _require(
            self.split in SPLITS, f"split must be one of {', '.join(SPLITS)}; got {self.split!r}"
        )
        _require(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        _require(
            self.classes_per_node >= 1,
            f"classes_per_node must be >= 1, got {self.classes_per_node}",
        )
        _require(self.min_per_node >= 1, f"min_per_node must be >= 1, got {self.min_per_node}")
        _require(
            0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}"
        )


@dataclass(frozen=True)
class ModelConfig:
    """A registry name plus keyword arguments for its factory."""

    name: str = "logreg"
    kwargs: dict[str, Any] = field(default_factory=dict)


OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainConfig:
    """Local training: ``epochs`` passes over the node's data, or exactly ``steps`` batches."""

    epochs: int = 1
    steps: int | None = None
    batch_size: int = 64
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        _require(self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _require(
            self.optimizer in OPTIMIZERS,
            f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}",
        )
        _require(self.momentum >= 0, f"momentum must be >= 0, got {self.momentum}")
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")


MIXING_RULES = ("none", "fixed", "metropolis", "learned", "median", "trimmed_mean", "krum")
TOPOLOGIES = ("complete", "ring", "regular", "erdos_renyi", "random_cohort")


@dataclass(frozen=True)
class MixingConfig:
    """How a node combines its cohort's parameters (DeGroot mixing) and how trust is learned."""

    rule: str = "learned"
    trust_lr: float = 5.0
    """Step size of plain SGD on the trust logits (much larger than the model's, on purpose)."""
    trust_steps: int = 10
    weight_floor: float = 0.0
    """Lowest weight any cohort member may get; keeps learned trust closer to uniform."""
    entropy_penalty: float = 0.0
    trim_ratio: float = 0.2
    """For ``trimmed_mean``: fraction cut from each end per coordinate."""
    byzantine: int = 1
    """For ``krum``: how many attackers to tolerate."""

    def __post_init__(self) -> None:
        _require(
            self.rule in MIXING_RULES,
            f"mixing rule must be one of {', '.join(MIXING_RULES)}; got {self.rule!r}",
        )
        _require(self.trust_lr > 0, f"trust_lr must be > 0, got {self.trust_lr}")
        _require(self.trust_steps >= 0, f"trust_steps must be >= 0, got {self.trust_steps}")
        _require(
            0 <= self.weight_floor < 1, f"weight_floor must be in [0, 1), got {self.weight_floor}"
        )
        _require(
            self.entropy_penalty >= 0, f"entropy_penalty must be >= 0, got {self.entropy_penalty}"
        )
        _require(
            0 <= self.trim_ratio < 0.5, f"trim_ratio must be in [0, 0.5), got {self.trim_ratio}"
        )
        _require(self.byzantine >= 0, f"byzantine must be >= 0, got {self.byzantine}")


@dataclass(frozen=True)
class TopologyConfig:
    """Who a node may mix with each round."""

    kind: str = "complete"
    degree: int = 2
    """Neighbours per node for ``regular`` and cohort size for ``random_cohort``."""
    edge_prob: float = 0.5
    """For ``erdos_renyi``."""

    def __post_init__(self) -> None:
        _require(
            self.kind in TOPOLOGIES,
            f"topology must be one of {', '.join(TOPOLOGIES)}; got {self.kind!r}",
        )
        _require(self.degree >= 1, f"degree must be >= 1, got {self.degree}")
        _require(0 < self.edge_prob <= 1, f"edge_prob must be in (0, 1], got {self.edge_prob}")
