"""Every notebook in notebooks/ runs top to bottom in quick mode, in the venv's own kernel.

The notebooks read ``FEDTORRENT_QUICK=1`` in their first cell and shrink rounds, nodes and data.
Some start real swarms (tracker and peers on 127.0.0.1), hence the ``network`` marker.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import require_dataset

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 150
"""Seconds one cell may run in quick mode before the test fails."""


def test_there_are_notebooks() -> None:
    assert len(NOTEBOOKS) >= 7


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_copy_shows_its_outputs(path: Path) -> None:
    """The committed copies are executed (at full size), so a reader sees results unrun."""
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "no code cells"
    assert all(cell.execution_count for cell in code), "a code cell was not executed"
    assert not any(out.get("output_type") == "error" for cell in code for out in cell.outputs)
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))


@pytest.mark.network
@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_in_quick_mode(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_dataset("mnist")
    require_dataset("fashion-mnist")
    monkeypatch.setenv("FEDTORRENT_QUICK", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as notebooks/run.py: threads only contend here
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # a failing cell raises CellExecutionError naming it
    kernel_python = notebook.cells[-1].outputs[0]["text"].strip()
    assert Path(kernel_python).resolve() == Path(sys.executable).resolve()
