"""fedtorrent: fully decentralized federated learning with learned trust.

The names below are the public API. They load lazily, so ``import fedtorrent`` stays fast and does
not pull in torch, aiohttp or ZeroMQ until a name that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # errors
    "FedTorrentError": "fedtorrent.errors",
    "ConfigError": "fedtorrent.errors",
    "DataError": "fedtorrent.errors",
    "DecodeError": "fedtorrent.errors",
    "NetworkError": "fedtorrent.errors",
    # settings
    "DataConfig": "fedtorrent.config",
    "ModelConfig": "fedtorrent.config",
    "TrainConfig": "fedtorrent.config",
    "MixingConfig": "fedtorrent.config",
    "TopologyConfig": "fedtorrent.config",
    "PrivacyConfig": "fedtorrent.config",
    "SimConfig": "fedtorrent.config",
    "TrackerConfig": "fedtorrent.config",
    # learning core
    "Dataset": "fedtorrent.data",
    "load_dataset": "fedtorrent.data",
    "split_nodes": "fedtorrent.data",
    "build_model": "fedtorrent.models",
    "register_model": "fedtorrent.models",
    "train_local": "fedtorrent.training",
    "evaluate": "fedtorrent.training",
    "train_centralized": "fedtorrent.training",
    "Metrics": "fedtorrent.training",
    "mix_stack": "fedtorrent.mixing.rules",
    "TrustLearner": "fedtorrent.mixing.trust",
    # bring your own task
    "Task": "fedtorrent.task",
    "NodeData": "fedtorrent.task",
    "builtin_task": "fedtorrent.task",
    "load_task": "fedtorrent.task",
    # simulator
    "simulate": "fedtorrent.sim.run",
    # network system
    "Session": "fedtorrent.net.torrent",
    "Torrent": "fedtorrent.net.torrent",
    "load_torrent": "fedtorrent.net.torrent",
    "create_session": "fedtorrent.net.create",
    "write_session": "fedtorrent.net.create",
    "TrackerServer": "fedtorrent.net.tracker.server",
    "BackgroundTracker": "fedtorrent.net.tracker.server",
    "TrackerClient": "fedtorrent.net.tracker.client",
    "Peer": "fedtorrent.node.peer",
    "PeerConfig": "fedtorrent.node.peer",
    "SwarmConfig": "fedtorrent.node.swarm",
    "run_swarm": "fedtorrent.node.swarm",
    # privacy and security
    "PrivacyAccountant": "fedtorrent.privacy",
    "Ledger": "fedtorrent.ledger",
    "verify_ledgers": "fedtorrent.ledger",
}

__all__ = [
    "BackgroundTracker",
    "ConfigError",
    "DataConfig",
    "DataError",
    "Dataset",
    "DecodeError",
    "FedTorrentError",
    "Ledger",
    "Metrics",
    "MixingConfig",
    "ModelConfig",
    "NetworkError",
    "NodeData",
    "Peer",
    "PeerConfig",
    "PrivacyAccountant",
    "PrivacyConfig",
    "Session",
    "SimConfig",
    "SwarmConfig",
    "Task",
    "TopologyConfig",
    "Torrent",
    "TrackerClient",
    "TrackerConfig",
    "TrackerServer",
    "TrainConfig",
    "TrustLearner",
    "__version__",
    "build_model",
    "builtin_task",
    "create_session",
    "evaluate",
    "load_dataset",
    "load_task",
    "load_torrent",
    "mix_stack",
    "register_model",
    "run_swarm",
    "simulate",
    "split_nodes",
    "train_centralized",
    "train_local",
    "verify_ledgers",
    "write_session",
]


def __getattr__(name: str) -> Any:
    """Import the module behind a public name on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedtorrent' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
