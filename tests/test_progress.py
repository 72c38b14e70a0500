"""Python runs show a progress bar on stderr in a terminal, and write nothing anywhere else."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fedtorrent as ft
from fedtorrent.config import DataConfig, SimConfig
from fedtorrent.progress import progress_bar


def _data(node: int, num_nodes: int) -> ft.NodeData:
    generator = torch.Generator().manual_seed(node)
    x = torch.randn(32, 4, generator=generator)
    y = (x[:, 0] > 0).long()
    return ft.NodeData(train=(x[:16], y[:16]), val=(x[16:24], y[16:24]), test=(x[24:], y[24:]))


TINY = ft.Task(model=lambda: nn.Linear(4, 2), data=_data)
CONFIG = SimConfig(data=DataConfig(num_nodes=2), rounds=2)


@pytest.fixture
def no_forced_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def forced_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")


def test_simulate_without_progress_writes_nothing_to_stderr(
    capfd: pytest.CaptureFixture[str], forced_terminal: None
) -> None:
    seen: list[tuple[int, int]] = []
    ft.simulate(CONFIG, task=TINY, progress=False, on_round=lambda c, d, t: seen.append((d, t)))
    assert seen == [(1, 2), (2, 2)]  # the caller's callback still runs
    assert capfd.readouterr().err == ""


def test_simulate_with_progress_off_a_terminal_runs_and_writes_nothing(
    capfd: pytest.CaptureFixture[str], no_forced_terminal: None
) -> None:
    seen: list[int] = []
    outcomes, _ = ft.simulate(
        [CONFIG, CONFIG.with_seed(1)], task=TINY, on_round=lambda c, d, t: seen.append(d)
    )
    assert len(outcomes) == 2
    assert seen == [1, 2, 1, 2]
    assert capfd.readouterr().err == ""


def test_simulate_draws_a_bar_on_a_terminal(
    capfd: pytest.CaptureFixture[str], forced_terminal: None
) -> None:
    seen: list[int] = []
    ft.simulate(CONFIG, task=TINY, on_round=lambda c, d, t: seen.append(d))
    captured = capfd.readouterr()
    assert seen == [1, 2]
    assert "2/2" in captured.err  # rounds done of rounds in all configs
    assert "2/2" not in captured.out  # stdout stays the caller's


def test_a_disabled_bar_ignores_updates(
    capfd: pytest.CaptureFixture[str], forced_terminal: None
) -> None:
    with progress_bar("x", total=3, enabled=False) as advance:
        advance(1, total=4, description="y")
    assert capfd.readouterr().err == ""


def test_a_bar_takes_its_total_late(
    capfd: pytest.CaptureFixture[str], forced_terminal: None
) -> None:
    with progress_bar("peers", total=None) as advance:
        advance(3, total=6, description="swarm: 2 running")
    assert "3/6" in capfd.readouterr().err
