"""Every Python example in docs/python.md runs as written, in order, in one namespace.

The examples run in a temporary folder that sees the repository's ``examples/`` (the page says
"from the repository root"), so they write their ``runs/`` there. The fast test runs the examples
before the swarm section; the network one runs them all, a real swarm and a real peer included.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "python.md"
SWARM_SECTION = "## `run_swarm`"


def _blocks(*, before: str | None = None) -> list[str]:
    text = PAGE.read_text()
    end = text.index(before) if before is not None else len(text)
    return [m.group(1) for m in re.finditer(r"```python\n(.*?)```", text, re.S) if m.start() < end]


def _run(blocks: list[str], folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    (folder / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(folder)
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))  # for the peer processes
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict[str, Any] = {"__name__": "docs_python"}
    try:
        for number, code in enumerate(blocks, start=1):
            exec(compile(code, f"docs/python.md block {number}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    return namespace


def test_the_page_is_linked_and_its_examples_parse() -> None:
    assert "docs/python.md" in (ROOT / "README.md").read_text()
    assert "(python.md)" in (ROOT / "docs" / "tasks.md").read_text()
    blocks = _blocks()
    assert len(blocks) >= 6
    for code in blocks:
        compile(code, "docs/python.md", "exec")


@pytest.mark.timeout(240)
def test_the_simulate_and_session_examples_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    namespace = _run(_blocks(before=SWARM_SECTION), tmp_path, monkeypatch)
    assert namespace["outcome"].model_paths[0].is_file()
    assert (tmp_path / "runs" / "api" / "session.torrent").is_file()
    assert (tmp_path / "runs" / "api" / "session.state").is_file()
    assert set(namespace["summary"]["by_mixing"]) == {"learned", "fixed"}


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_every_example_runs_a_swarm_and_a_peer_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    namespace = _run(_blocks(), tmp_path, monkeypatch)
    assert namespace["final"] == "done"
    assert namespace["summary"]["finished"] == 2
    assert "accuracy" in namespace["peer"].records[-1]["test_metrics"]
