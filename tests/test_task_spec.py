"""A Task object handed to drivers that start other processes becomes a spec those processes import.

Peers never receive pickled objects: ``task_spec`` names where a Task lives (the spec it was
loaded from, or its module-level name), and a Task with no such name is one ConfigError line.
``Peer(task=...)`` uses a Task object in-process as it is.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fedtorrent as ft
from fedtorrent.config import DataConfig, MixingConfig, TrainConfig
from fedtorrent.errors import ConfigError, TrackerError
from fedtorrent.net.tracker.client import PeerAddress, TrackerAnswer
from fedtorrent.net.transport import Endpoint, MemoryNetwork, MemoryTransport
from fedtorrent.node.peer import Peer, PeerConfig
from fedtorrent.node.swarm import PEER_MARK, Swarm, SwarmConfig
from fedtorrent.task import load_task, task_spec

ROOT = Path(__file__).resolve().parents[1]
CALLS: list[tuple[int, int]] = []


def _data(node: int, num_nodes: int) -> ft.NodeData:
    CALLS.append((node, num_nodes))
    generator = torch.Generator().manual_seed(node)
    x = torch.randn(48, 4, generator=generator)
    y = (x[:, 0] > 0).long()
    return ft.NodeData(train=(x[:32], y[:32]), val=(x[32:40], y[32:40]), test=(x[40:], y[40:]))


TINY = ft.Task(model=lambda: nn.Linear(4, 2), data=_data)
"""Module level of this test module: a name another process can import."""

TASK_FILE = textwrap.dedent(
    """
    from torch import nn
    import fedtorrent as ft

    def data(node, num_nodes):
        raise AssertionError("not called")

    task = ft.Task(model=lambda: nn.Linear(2, 2), data=data)
    alias = task

    def make():
        return ft.Task(model=lambda: nn.Linear(2, 2), data=data)
    """
)


def test_a_module_level_task_is_named_by_its_file() -> None:
    assert task_spec(TINY) == f"{Path(__file__).resolve()}:TINY"
    assert load_task(task_spec(TINY)).model().in_features == 4  # and it loads back


def test_a_loaded_task_keeps_the_spec_it_came_from_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mytask.py").write_text(TASK_FILE)
    monkeypatch.chdir(tmp_path)
    made = load_task("mytask.py:make")  # a factory: loading the spec again calls it again
    assert task_spec(made) == f"{tmp_path.resolve() / 'mytask.py'}:make"
    assert task_spec(load_task("./mytask.py:alias")).endswith("mytask.py:alias")


def test_a_task_of_a_package_module_is_named_by_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "speclab"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text(TASK_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("speclab.tasks")
    try:
        assert task_spec(module.task) == "speclab.tasks:task"  # its relative imports keep working
        with pytest.raises(ConfigError, match="module level"):
            task_spec(module.make())  # made there, but in a function: no name
    finally:
        for name in ("speclab.tasks", "speclab"):
            sys.modules.pop(name, None)


def test_a_task_made_in_a_function_or_copied_is_one_clear_line() -> None:
    local = ft.Task(model=lambda: nn.Linear(4, 2), data=_data)
    with pytest.raises(ConfigError, match=r'module level of a \.py file and pass "file\.py:NAME"'):
        task_spec(local)
    with pytest.raises(ConfigError, match="module level"):
        task_spec(dataclasses.replace(TINY, buffers="local"))  # a copy is not TINY
    with pytest.raises(ConfigError, match=r"fedtorrent\.Task"):
        task_spec("not a task")  # type: ignore[arg-type]


def _python(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args] if not code else [sys.executable, "-c", code],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_a_script_names_its_file_and_the_prompt_gets_the_line(tmp_path: Path) -> None:
    body = TASK_FILE + "\nfrom fedtorrent.task import task_spec\nprint(task_spec(task))\n"
    script = tmp_path / "run_me.py"
    script.write_text(body)
    ran = _python("", str(script), cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() in (f"{script.resolve()}:task", f"{script.resolve()}:alias")
    prompt = _python(body, cwd=tmp_path)  # python -c, like a notebook cell: no file to import
    assert prompt.returncode != 0
    assert "define it at module level of a .py file" in prompt.stderr


def test_swarm_config_turns_a_task_object_into_its_spec(tmp_path: Path) -> None:
    config = SwarmConfig(torrent=tmp_path / "t.torrent", out=tmp_path, peers=2, task=TINY)
    assert config.task == f"{Path(__file__).resolve()}:TINY"
    with pytest.raises(ConfigError, match="module level"):
        SwarmConfig(torrent=tmp_path / "t.torrent", out=tmp_path, task=ft.Task(
            model=lambda: nn.Linear(4, 2), data=_data))  # fmt: skip


def test_a_peer_process_that_starts_a_swarm_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PEER_MARK, "1")
    swarm = Swarm(SwarmConfig(torrent=tmp_path / "t.torrent", out=tmp_path, task=TINY))
    with pytest.raises(ConfigError, match='if __name__ == "__main__"'):
        swarm.start()


# -- Peer(task=...) in-process --------------------------------------------------------------------


class _NoTracker:
    def announce(self, info_hash: str, peer_id: str, **kw: Any) -> TrackerAnswer:
        raise TrackerError("no tracker (test)")


class _MemAddressing:
    def port_of(self, address: str) -> int:
        return int(address.removeprefix("mem://")) + 1

    def endpoint(self, peer: PeerAddress) -> Endpoint:
        return Endpoint(peer_id=peer.peer_id, address=f"mem://{peer.port - 1}")


def _torrent(folder: Path) -> Path:
    session, state = ft.create_session(
        task=TINY,
        data=DataConfig(num_nodes=1),
        train=TrainConfig(batch_size=8, lr=0.1),
        mixing=MixingConfig(rule="fixed"),
        rounds=2,
        cohort_size=1,
    )
    path = folder / "session.torrent"
    ft.write_session(path, session, state, tracker="http://127.0.0.1:9/announce")
    return path


def _peer(config: PeerConfig, **kw: Any) -> Peer:
    network = MemoryNetwork()
    return Peer(
        config,
        transport=lambda cfg: MemoryTransport(network, cfg),
        tracker=_NoTracker(),
        addressing=_MemAddressing(),
        **kw,
    )


@pytest.mark.timeout(60)
def test_a_peer_runs_a_task_object_on_its_own_data(tmp_path: Path) -> None:
    torrent = _torrent(tmp_path)
    CALLS.clear()
    config = PeerConfig(torrent=torrent, out_dir=tmp_path / "p", exchange_timeout=0.3, linger=0)
    with _peer(config, task=TINY) as peer:  # no --node-index: a peer that owns its data
        assert peer.run() == "done"
    assert (0, 1) in CALLS
    lines = (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["round"] for r in records] == [1, 2]
    assert "accuracy" in records[-1]["test_metrics"]


def test_a_peer_takes_the_task_once_and_a_built_in_torrent_takes_none(tmp_path: Path) -> None:
    torrent = _torrent(tmp_path)
    spec = PeerConfig(torrent=torrent, out_dir=tmp_path / "p", task=task_spec(TINY))
    with pytest.raises(ConfigError, match="give the task once"):
        _peer(spec, task=TINY)
    session, state = ft.create_session(data=DataConfig(dataset="digits", num_nodes=1), rounds=1)
    built_in = tmp_path / "digits.torrent"
    ft.write_session(built_in, session, state, tracker="http://127.0.0.1:9/announce")
    peer = _peer(PeerConfig(torrent=built_in, out_dir=tmp_path / "b"), task=TINY)
    with pytest.raises(ConfigError, match="runs the built-in model 'logreg' on digits"):
        peer.start()
    peer.close()


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_run_swarm_takes_a_task_object_from_an_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    tabular = importlib.import_module("tabular")  # a module of its own: no load_task involved
    try:
        session, state = ft.create_session(
            task=tabular.task, data=DataConfig(num_nodes=2), rounds=2, cohort_size=1
        )
        torrent = tmp_path / "session.torrent"
        ft.write_session(torrent, session, state, tracker="http://127.0.0.1:9/announce")
        config = ft.SwarmConfig(
            torrent=torrent,
            out=tmp_path / "run",
            peers=2,
            task=tabular.task,
            exchange_timeout=20,
            env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"},
        )
        assert config.task == f"{ROOT / 'examples' / 'tabular.py'}:task"
        summary = ft.run_swarm(config, timeout=200, plots=False)
    finally:
        sys.modules.pop("tabular", None)
    assert session.task is not None and session.task.label == "tabular:task"
    assert summary["finished"] == 2, summary["per_peer"]
    assert summary["test_metrics"]["accuracy"]["peers"] == 2
    assert summary["test_metrics"]["accuracy"]["mean"] > 0.7  # the majority class gives 0.63


def test_threads_loading_one_task_file_at_once_all_get_the_task(tmp_path: Path) -> None:
    """Hosted peers are threads of one process: none may see the module half executed."""
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "slowtask.py"
    path.write_text("import time\ntime.sleep(0.3)  # a slow import widens the window\n" + TASK_FILE)
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda _: load_task(f"{path}:alias"), range(4)))
    assert all(isinstance(task, ft.Task) for task in loaded)
