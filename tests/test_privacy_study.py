"""``experiments/privacy.py --quick`` writes its tables; ``--resume`` skips the done cells.

The real script in a subprocess on digits (no files needed), 3 nodes, 3 rounds, 1 seed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "privacy.py"


def _run(out: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), *args],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_quick_privacy_study_spends_at_most_its_targets_and_resumes(tmp_path: Path) -> None:
    """Every DP cell spends at most its target epsilon; the no-DP row spends none."""
    first = _run(tmp_path, "--only", "example", "node", "central")
    cells = json.loads((tmp_path / "privacy.json").read_text())["cells"]
    assert {c["cell"]["section"] for c in cells.values()} == {"example", "node", "central"}
    for cell in cells.values():
        target, spent = cell["cell"]["epsilon"], cell["epsilon"]
        if target is None:
            assert spent == [None]
        else:
            assert all(0 < e <= target * 1.01 for e in spent), (target, spent)
        assert all(0 <= a <= 100 for a in cell["accuracy"])
    text = (tmp_path / "privacy.md").read_text()
    assert "## Example-level DP-SGD" in text and "## Centralized DP-SGD" in text
    assert sum(line.startswith("[") for line in first.splitlines()) == len(cells)
    again = _run(tmp_path, "--only", "example", "node", "central", "--resume")
    assert not any(line.startswith("[") for line in again.splitlines()), "resume reran a cell"
