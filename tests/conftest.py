"""Shared test helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Real peer processes run beside this one on 2 cores: one torch thread here keeps them from
# spinning against each other (every CLI test used to set it through `simulate --threads 1`).
torch.set_num_threads(1)


def require_dataset(name: str) -> None:
    """Skip the calling test unless dataset ``name`` is on disk (``$FEDTORRENT_DATA`` or the cache).

    CI points ``FEDTORRENT_DATA`` at the offline copies, so these tests run there; on a machine
    with neither the copies nor a filled cache (and no internet) they skip instead of failing.
    """
    roots = [os.environ.get("FEDTORRENT_DATA"), Path.home() / ".cache" / "fedtorrent"]
    for root in roots:
        folder = Path(root) / name if root else None
        if folder is not None and folder.is_dir() and any(folder.iterdir()):
            return
    pytest.skip(f"{name} is not on disk (set FEDTORRENT_DATA)")


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """Run ``fedtorrent ARGS`` in this process; its exit status (0 when it returned)."""
    from fedtorrent.cli import main

    monkeypatch.setattr(sys, "argv", ["fedtorrent", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return int(exit_.value.code or 0)
