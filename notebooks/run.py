"""Execute the companion notebooks in place, at full size, saving their outputs.

Usage: ``python notebooks/run.py [NOTEBOOK ...]`` (default: every ``notebooks/*.ipynb``, one at a
time, in name order). Each runs in the ``python3`` kernel of the interpreter running this script,
with its folder as the working directory, and ``FEDTORRENT_QUICK`` removed from the environment,
so the saved copies show the full-size results. Torch gets one thread (``OMP_NUM_THREADS=1``
unless set), as ``fedtorrent simulate --threads 1``: on shared cores more threads only wait on
each other. Datasets come from ``$FEDTORRENT_DATA``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
CELL_TIMEOUT = 900
"""Seconds one cell may run at full size."""


def execute(path: Path) -> None:
    """Run ``path`` top to bottom and write it back with its outputs (no timing metadata)."""
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    nbformat.write(notebook, path)


def main(names: list[str]) -> None:
    """Execute ``names`` (default: every notebook here) at full size, printing seconds each."""
    os.environ.pop("FEDTORRENT_QUICK", None)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as `fedtorrent simulate --threads 1`
    paths = [Path(name).resolve() for name in names] or sorted(HERE.glob("*.ipynb"))
    for path in paths:
        start = time.perf_counter()
        execute(path)
        print(f"{path.name}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
