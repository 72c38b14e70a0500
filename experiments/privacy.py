"""Accuracy against epsilon: example-level DP-SGD beside node-level DP (issue 15, part 4).

    FEDTORRENT_DATA=../shared/data .venv/bin/python experiments/privacy.py [--resume]
        [--only example node central swarm] [--seeds 2] [--quick] [--work runs/privacy]

Writes ``results/privacy.md`` and ``results/privacy.json``. Every number comes from runs:

- ``example``: example-level DP-SGD (``--dp-unit example``: per-example clipping to
  ``CLIP``, Gaussian noise, Poisson sampling), 6 iid nodes, fixed and learned mixing, at target
  epsilons 0.5 to 8 (delta 1e-5, RDP), MNIST and Fashion-MNIST, logistic regression (the
  issue's recipe: batch 256, lr 0.5, constant schedule, 30 rounds) and, on MNIST, the CNN
  (fixed mixing, fewer rounds and steps, one seed, epsilons 1 and 8); the rows without DP
  beside them;
- ``node``: today's update-level DP (each shared update clipped to ``NODE_CLIP`` and noised)
  at the same target epsilons, fixed mixing, logistic regression: the protected unit is then
  a node's whole dataset;
- ``central``: centralized DP-SGD on the same data, the reference the literature reports (one
  node holding all six nodes' training examples, ``--nodes 1``), at the same epsilons;
- ``swarm``: a real 6-peer swarm (``fedtorrent create ... --dp-unit example``, fixed mixing,
  every peer in every other's cohort) at epsilon 1 on MNIST logistic regression, beside the
  simulator's cell (seed 0).

A cell is one setting over every seed; each finished cell is written to the JSON at once, and
``--resume`` skips cells already there. ``--quick`` runs digits, 3 nodes, 3 rounds, 1 seed into
``runs/privacy_quick``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

import fedtorrent as ft
from fedtorrent.metrics.records import write_json
from fedtorrent.sim.run import load_for

SECTIONS = ("example", "node", "central", "swarm")
EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0)
CNN_EPSILONS = (1.0, 8.0)
DELTA = 1e-5
CLIP = 1.0
"""Per-example gradient clip norm (the issue's recipe)."""
NODE_CLIP = 0.02
"""Node-level DP's update clip norm (``experiments/security.py``'s earlier table used it)."""
RECIPE = {"batch_size": 256, "lr": 0.5}
"""Local training of the logistic-regression rows: the issue's recipe, constant schedule."""
ROUNDS = 30
CNN = {"rounds": 10, "batch_size": 128, "lr": 0.1, "steps": 20}
"""The CNN rows' rounds and local training (20 steps a round, one seed, fixed mixing): what 2
CPU cores afford. Learned trust's private fit costs about a minute a round on the CNN
(``benchmarks/trust_dp_speed.py --model cnn``), so the CNN has no learned rows."""
NODES = 6
SWARM_EPSILON = 1.0


@dataclasses.dataclass(frozen=True)
class Cell:
    """One setting, run over every seed (a swarm cell: seed 0 only)."""

    section: str
    dataset: str
    model: str
    rule: str
    epsilon: float | None
    """Target epsilon at ``DELTA``; None: no DP."""
    nodes: int = NODES
    rounds: int = ROUNDS

    def key(self, seeds: int) -> str:
        """A name unique to this cell and its seeds (the JSON's key)."""
        eps = "off" if self.epsilon is None else f"eps{self.epsilon:g}"
        parts = [self.section, self.dataset, self.model, f"n{self.nodes}", self.rule, eps]
        return "/".join([*parts, f"s{seeds}", f"r{self.rounds}"])

    def privacy(self) -> ft.PrivacyConfig | None:
        """The cell's privacy settings (None: no DP)."""
        if self.epsilon is None:
            return None
        unit = "node" if self.section == "node" else "example"
        clip = NODE_CLIP if unit == "node" else CLIP
        return ft.PrivacyConfig(clip=clip, target_epsilon=self.epsilon, delta=DELTA, unit=unit)

    def train(self) -> dict[str, Any]:
        """Local training settings of the cell's model."""
        if self.model == "cnn":
            return {"batch_size": CNN["batch_size"], "lr": CNN["lr"], "steps": CNN["steps"]}
        return dict(RECIPE)

    def config(self) -> ft.SimConfig:
        """The cell's ``SimConfig`` at seed 0."""
        base = ft.SimConfig()
        return ft.SimConfig(
            data=ft.DataConfig(dataset=self.dataset, num_nodes=self.nodes),
            model=ft.ModelConfig(name=self.model),
            mixing=ft.MixingConfig(rule=self.rule),
            train=dataclasses.replace(base.train, **self.train()),
            rounds=self.rounds,
            round_schedule="constant",
            eval_every=self.rounds,
            privacy=self.privacy(),
        )


def cells(sections: list[str], quick: bool) -> list[Cell]:
    """The chosen sections' cells (module docstring)."""
    if quick:
        small = {"nodes": 3, "rounds": 3}
        out = [Cell("example", "digits", "logreg", "fixed", e, **small) for e in (None, 1.0)]
        out += [Cell("node", "digits", "logreg", "fixed", 1.0, **small)]
        out += [Cell("central", "digits", "logreg", "none", 1.0, nodes=1, rounds=3)]
        out += [Cell("swarm", "digits", "logreg", "fixed", 1.0, **small)]
        return [c for c in out if c.section in sections]
    chosen: list[Cell] = []
    if "swarm" in sections:
        chosen.append(Cell("swarm", "mnist", "logreg", "fixed", SWARM_EPSILON))
    for dataset in ("mnist", "fashion-mnist"):
        if "example" in sections:
            for rule in ("fixed", "learned"):
                chosen += [Cell("example", dataset, "logreg", rule, e) for e in (None, *EPSILONS)]
        if "node" in sections:
            chosen += [Cell("node", dataset, "logreg", "fixed", e) for e in EPSILONS]
        if "central" in sections:
            chosen += [
                Cell("central", dataset, "logreg", "none", e, nodes=1) for e in (None, *EPSILONS)
            ]
    if "example" in sections:  # the slowest cells last
        chosen += [
            Cell("example", "mnist", "cnn", "fixed", e, rounds=int(CNN["rounds"]))
            for e in (None, *CNN_EPSILONS)
        ]
    return chosen


_DATA: dict[str, Any] = {}


def run_cell(cell: Cell, seeds: int) -> dict[str, Any]:
    """Run ``cell`` in the simulator on seeds ``0 .. seeds-1``: accuracy and epsilon per seed."""
    if cell.dataset not in _DATA:
        _DATA[cell.dataset] = load_for(cell.config())
    tick = time.perf_counter()
    outcomes, _ = ft.simulate(
        [cell.config().with_seed(s) for s in range(seeds)],
        out_dir=None,
        dataset=_DATA[cell.dataset],
        plots=False,
        progress=False,
    )
    epsilons = [
        float(o.security["epsilon"]) if o.security and o.security.get("epsilon") else None
        for o in outcomes
    ]
    return {
        "cell": dataclasses.asdict(cell) | {"seeds": seeds},
        "accuracy": [100 * mean(o.accuracies) for o in outcomes],
        "epsilon": epsilons,
        "seconds": time.perf_counter() - tick,
    }


def run_swarm_cell(cell: Cell, work: Path) -> dict[str, Any]:
    """A real swarm of ``cell.nodes`` peer processes on loopback with the cell's settings."""
    from fedtorrent.cli.net import create  # noqa: PLC0415  (the CLI body: only this section)
    from fedtorrent.node.swarm import SwarmConfig, run_swarm  # noqa: PLC0415

    folder = work / cell.key(1).replace("/", "_")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torrent = folder / "session.torrent"
    privacy = cell.privacy()
    assert privacy is not None
    train = cell.train()
    create(
        output=torrent, dataset=cell.dataset, model=cell.model, nodes=cell.nodes,
        rounds=cell.rounds, cohort=cell.nodes - 1, mixing=cell.rule, round_schedule="constant",
        batch_size=train["batch_size"], lr=train["lr"], dp_clip=privacy.clip,
        dp_epsilon=privacy.target_epsilon, dp_delta=privacy.delta, dp_unit=privacy.unit,
    )  # type: ignore[arg-type]  # fmt: skip
    tick = time.perf_counter()
    config = SwarmConfig(
        torrent=torrent, out=folder / "swarm", peers=cell.nodes,
        data_dir=Path(os.environ.get("FEDTORRENT_DATA", "../shared/data")), exchange_timeout=60,
    )  # fmt: skip
    summary = run_swarm(config, timeout=3600, plots=False, progress=False)
    security = summary.get("security") or {}
    return {
        "cell": dataclasses.asdict(cell) | {"seeds": 1},
        "accuracy": [100 * float(summary["test_accuracy_mean"])],
        "epsilon": [security.get("epsilon")],
        "finished": summary["finished"],
        "seconds": time.perf_counter() - tick,
    }


def _stat(values: list[float]) -> str:
    """``mean ± std`` over the seeds' values; one seed shows its value alone."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{mean(values):.2f} ± {pstdev(values):.2f}" if values else "-"


def _eps(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    return f"{max(present):.3f}" if present else "no DP"


def report(record: dict[str, Any], seeds: int) -> str:
    """``results/privacy.md`` from the JSON record; ``seeds``: the command's ``--seeds``."""
    results = list(record["cells"].values())
    lines = [
        "# Accuracy against epsilon",
        "",
        f"Produced by `python experiments/privacy.py --seeds {seeds}` (module docstring: the "
        "grid and options); "
        "every number is read from the runs. Accuracy: final mean test accuracy over the nodes "
        "(%), mean ± std over seeds; epsilon: the largest any node spent, at delta "
        f"{DELTA:g} (RDP accountant, Opacus), after the last round. Example-level DP protects "
        "one training example of a node; node-level DP a node's whole dataset.",
    ]
    sections = {
        "example": (
            "Example-level DP-SGD, iid nodes",
            f"Per-example gradients clipped to {CLIP:g}, Gaussian noise, Poisson sampling; "
            f"logistic regression: batch {RECIPE['batch_size']}, lr {RECIPE['lr']:g}, constant "
            f"schedule, {ROUNDS} rounds; CNN: batch {CNN['batch_size']}, lr {CNN['lr']:g}, "
            f"{CNN['steps']} steps a round, {CNN['rounds']} rounds, one seed, fixed mixing only "
            "(learned trust's private fit takes about a minute a round on the CNN here: "
            "`benchmarks/trust_dp_speed.py --model cnn`).",
        ),
        "node": (
            "Node-level DP (update-level), iid nodes, fixed mixing",
            f"Each shared update clipped to {NODE_CLIP:g} and noised; the same training recipe.",
        ),
        "central": (
            "Centralized DP-SGD on the same data (one node holding all six nodes' examples)",
            "The reference the literature reports (Abadi et al. 2016: about 97% on MNIST at "
            "epsilon 2 with a small network and PCA features; logistic regression is weaker).",
        ),
        "swarm": (
            "A real swarm next to the simulator",
            "Real `fedtorrent peer` processes on loopback, every peer in every other's cohort, "
            "against the simulator's cell with the same settings (seed 0).",
        ),
    }
    for section, (title, note) in sections.items():
        rows = [r for r in results if r["cell"]["section"] == section]
        if not rows:
            continue
        lines += ["", f"## {title}", "", note, ""]
        if section == "swarm":
            lines += [
                "| dataset | model | peers | rule | target epsilon | swarm accuracy | "
                "swarm epsilon | simulator accuracy, seed 0 | minutes |",
                "|---|---|---:|---|---:|---:|---:|---:|---:|",
            ]
            for r in rows:
                cell = r["cell"]
                twin = _twin(record, cell)
                sim = f"{twin['accuracy'][0]:.2f}" if twin else "-"
                lines.append(
                    f"| {cell['dataset']} | {cell['model']} | {cell['nodes']} | {cell['rule']} | "
                    f"{cell['epsilon']:g} | {r['accuracy'][0]:.2f} | {_eps(r['epsilon'])} | "
                    f"{sim} | {r['seconds'] / 60:.1f} |"
                )
            continue
        lines += [
            "| dataset | model | nodes | rule | target epsilon | epsilon spent | accuracy "
            "| minutes |",
            "|---|---|---:|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            cell = r["cell"]
            target = "no DP" if cell["epsilon"] is None else f"{cell['epsilon']:g}"
            lines.append(
                f"| {cell['dataset']} | {cell['model']} | {cell['nodes']} | {cell['rule']} | "
                f"{target} | "
                f"{_eps(r['epsilon'])} | {_stat(r['accuracy'])} | {r['seconds'] / 60:.1f} |"
            )
    seconds = sum(float(r["seconds"]) for r in results)
    lines += ["", f"Run time of the cells shown: {seconds / 60:.1f} minutes on 2 CPU cores."]
    return "\n".join(lines) + "\n"


def _twin(record: dict[str, Any], cell: dict[str, Any]) -> dict[str, Any] | None:
    """The simulator's example-level result with a swarm cell's settings (None: not run)."""
    results: list[dict[str, Any]] = list(record["cells"].values())
    for result in results:
        other = result["cell"]
        keys = ("dataset", "model", "rule", "epsilon", "nodes", "rounds")
        if other["section"] == "example" and all(other[k] == cell[k] for k in keys):
            return result
    return None


def main() -> None:
    """Parse the options, run the missing cells, write the JSON after each and the markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 2)")
    parser.add_argument("--quick", action="store_true", help="digits, 3 nodes, 3 rounds, 1 seed")
    parser.add_argument("--resume", action="store_true", help="skip cells already in the JSON")
    parser.add_argument("--out", type=Path, default=None, help="default results/")
    parser.add_argument("--work", type=Path, default=Path("runs/privacy"), help="swarm folders")
    args = parser.parse_args()
    seeds = args.seeds or (1 if args.quick else 2)
    if seeds < 1:
        parser.error("--seeds must be >= 1")
    out = args.out or Path("runs/privacy_quick" if args.quick else "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "privacy.json"
    loaded = json.loads(path.read_text()) if path.exists() else None
    # anything else (the earlier table's list of rows) is replaced
    record: dict[str, Any] = (
        loaded if isinstance(loaded, dict) and "cells" in loaded else {"cells": {}}
    )
    chosen = cells(args.only, args.quick)
    for index, cell in enumerate(chosen, start=1):
        swarm = cell.section == "swarm"
        cell_seeds = 1 if swarm or cell.model == "cnn" else seeds
        key = cell.key(cell_seeds)
        if args.resume and key in record["cells"]:
            continue
        print(f"[{index}/{len(chosen)}] {key}", flush=True)
        record["cells"][key] = (
            run_swarm_cell(cell, args.work) if swarm else run_cell(cell, cell_seeds)
        )
        write_json(path, record)
    write_json(path, record)
    text = report(record, seeds)
    (out / "privacy.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
