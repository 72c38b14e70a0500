"""``experiments/trust_study.py --quick`` writes its tables; ``--resume`` skips the done cells.

The real script in a subprocess on digits (no files needed), 6 nodes, 4 rounds, 1 seed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "trust_study.py"


def _run(out: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _started(stdout: str) -> list[str]:
    """The script's ``[i/n] key`` lines: one per cell it ran."""
    return [line for line in stdout.splitlines() if line.startswith("[")]


@pytest.mark.slow
def test_quick_study_writes_tables_and_resumes(tmp_path: Path) -> None:
    """Clustered and attacker cells land in the JSON; oracle keeps all weight in its cluster;
    the heatmaps are drawn and named in the markdown."""
    first = _run(tmp_path, "--only", "clustered", "attacker")
    record = json.loads((tmp_path / "trust.json").read_text())
    cells = record["cells"]
    sections = {c["cell"]["section"] for c in cells.values()}
    assert sections == {"clustered", "attacker"}
    oracle = [c for c in cells.values() if c["cell"]["variant"] == "oracle"]
    assert oracle, "no oracle cell"
    for cell in oracle:
        assert cell["per_seed"]["cluster_share"] == pytest.approx([1.0])
    for cell in cells.values():
        for value in cell["per_seed"]["own_accuracy"]:
            assert 0 <= value <= 100
    attacked = [c for c in cells.values() if c["cell"]["section"] == "attacker"]
    assert all(len(c["per_seed"]["rounds_to_exclusion"]) == 1 for c in attacked)
    text = (tmp_path / "trust.md").read_text()
    assert "## Clustered peers" in text and "## The delayed attacker" in text
    pictures = sorted(p.name for p in (tmp_path / "plots").glob("trust_clustered_*.png"))
    assert pictures == [
        f"trust_clustered_{r}.png" for r in ("fedfomo", "fixed", "learned", "oracle")
    ]
    assert all(f"plots/{name}" in text for name in pictures)
    assert len(_started(first)) == len(cells)
    again = _run(tmp_path, "--only", "clustered", "attacker", "--resume")
    assert _started(again) == [], "resume ran a done cell again"
    assert json.loads((tmp_path / "trust.json").read_text())["cells"].keys() == cells.keys()
