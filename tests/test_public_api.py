"""The public surface changes only on purpose, and importing the package stays light."""

import subprocess
import sys

import fedtorrent

EXPECTED = {
    "__version__",
    "FedTorrentError",
    "ConfigError",
    "DataError",
    "DecodeError",
    "NetworkError",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "MixingConfig",
    "TopologyConfig",
    "PrivacyConfig",
    "SimConfig",
    "TrackerConfig",
    "Dataset",
    "load_dataset",
    "split_nodes",
    "build_model",
    "register_model",
    "train_local",
    "evaluate",
    "train_centralized",
    "Metrics",
    "mix_stack",
    "TrustLearner",
    "Task",
    "NodeData",
    "builtin_task",
    "load_task",
    "simulate",
    "Session",
    "Torrent",
    "load_torrent",
    "create_session",
    "write_session",
    "TrackerServer",
    "BackgroundTracker",
    "TrackerClient",
    "Peer",
    "PeerConfig",
    "SwarmConfig",
    "run_swarm",
    "PrivacyAccountant",
    "Ledger",
    "verify_ledgers",
}


def test_exported_names_are_exactly_the_public_api() -> None:
    assert set(fedtorrent.__all__) == EXPECTED
    assert len(fedtorrent.__all__) == len(EXPECTED)


def test_every_exported_name_resolves() -> None:
    for name in fedtorrent.__all__:
        assert getattr(fedtorrent, name) is not None, name


def test_unknown_attribute_raises_attribute_error() -> None:
    try:
        fedtorrent.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_importing_the_package_does_not_load_heavy_libraries() -> None:
    code = (
        "import sys, fedtorrent, fedtorrent.config, fedtorrent.errors;"
        "print(','.join(m for m in ('torch', 'zmq', 'aiohttp', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_every_export_has_a_home_module() -> None:
    assert set(fedtorrent.__all__) - {"__version__"} == set(fedtorrent._EXPORTS)
