"""Where learned trust matters (issue 14, part 4); writes ``results/trust.md`` and ``trust.json``.

    FEDTORRENT_DATA=../shared/data .venv/bin/python experiments/trust_study.py [--resume]
        [--only clustered skew attacker swarm] [--seeds 3] [--rounds R] [--grid default|full]
        [--quick] [--work runs/trust_swarm]

Four sections, each a table of mean ± std over seeds (per seed: the mean over nodes), every
number from simulator runs (``ft.simulate``, the ``simulate`` defaults unless said):

- ``clustered``: ``--split label_swap`` (and ``rotated``) ``--clusters K``; own-distribution
  accuracy for none / fixed / learned / fedfomo / oracle and the within-cluster weight share,
  on the complete graph and on random cohorts of 3 (``random_cohort``, degree 3), the latter
  also with trust-guided cohorts (``--trust-cohorts 0.34``, learned only: they read its logits).
- ``skew``: Dirichlet label skew (``--split noniid --alpha A``), 12 nodes, complete graph:
  global and own-distribution accuracy for none / fixed / learned, and learned with
  ``--weight-floor`` / ``--entropy-penalty`` settings (the personalization-generalization
  trade-off, one row per setting).
- ``attacker``: the delayed attacker (``--attack-from R``, one attacker among 12, learned trust,
  ``--plausibility 0`` so that trust alone must react, and again behind the default screen):
  rounds to exclusion (weight below 0.01).
- ``swarm``: real ``fedtorrent peer`` processes on loopback (``fedtorrent create ... --cohort
  N-1``, one seed) for fixed / learned / fedfomo on MNIST label_swap K = 3 with 12 peers,
  next to the simulator's cell of the same setting (peer folders under ``--work``).

Heatmaps: the last weights (seed 0) of fixed, learned, fedfomo and oracle in the largest
complete-graph label_swap K = 3 setting, nodes ordered by cluster, in ``plots/``.

A cell is one setting and one rule variant over all seeds. Each finished cell is written to the
JSON at once, so an interrupted run keeps its results; ``--resume`` skips cells already there (a
cell's key names its dataset, model, split, nodes, topology, variant, seeds and rounds). Without
``--resume`` the chosen cells are run again and replace their old entries; the others are kept.
The markdown is drawn from the JSON only.

Grids. ``--grid full`` is the issue's whole cross product: MNIST and Fashion-MNIST, logreg and
the CNN, label_swap and rotated, K in {2, 3, 4}, 12 and 24 nodes, complete and random cohorts
(with and without trust-guided cohorts); skew on both datasets; several attackers. Far too long
for one go on 2 CPU cores (many hours; run it in pieces with ``--resume``). The default grid is
the subset that answers the issue's questions:

- clustered, logistic regression, MNIST and Fashion-MNIST: label_swap with K = 2, 3, 4 at 24
  nodes on the complete graph; K = 3 at 12 nodes; rotated K = 3 at 24 nodes; K = 3, 24 nodes on
  random cohorts of 3, without and with trust-guided cohorts. The CNN (``CNN``: fewer rounds
  and local steps) is in ``--grid full`` only: one MNIST label_swap K = 3 row of 12 nodes takes
  about 8 minutes a rule with 3 seeds here (40 for the row).
- skew: MNIST logistic regression, alpha in {0.1, 0.3, 1, 10}.
- attacker: MNIST logistic regression, sign_flip and noise, from rounds/3 and 2 rounds/3, with
  the screen off and on.
- swarm: MNIST label_swap K = 3, 12 real peers.

The default grid's run time is stated in ``results/trust.md`` (the README lists it).
``--quick`` (digits, 6 nodes, K = 3, 4 rounds, 1 seed, to ``runs/trust_quick``) takes well
under a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

import fedtorrent as ft
from fedtorrent.metrics.plots import plot_weights
from fedtorrent.metrics.records import read_records, write_json
from fedtorrent.sim.run import load_for

SECTIONS = ("clustered", "skew", "attacker", "swarm")
CLUSTER_RULES = ("none", "fixed", "learned", "fedfomo", "oracle")
SKEW_RULES = ("none", "fixed", "learned")
SKEW_VARIANTS: dict[str, dict[str, float]] = {
    "learned floor=0.05": {"weight_floor": 0.05},
    "learned entropy=0.2": {"entropy_penalty": 0.2},
}
"""Learned trust held closer to uniform (floors stay below 1/12: 12 nodes)."""
EXPLORATION = 0.34
"""Trust-guided cohorts' exploration share (``--trust-cohorts``): 1 of 3 members at random."""
COHORT = 3
CNN = {"rounds": 10, "steps": 20}
"""The CNN rows' rounds and local steps per round: what 2 CPU cores afford."""
EXCLUDED = 0.01
HEATMAP_RULES = ("fixed", "learned", "fedfomo", "oracle")
"""The rules whose last weights are drawn, for the largest complete-graph label_swap K=3 cell."""
SWARM_RULES = ("fixed", "learned", "fedfomo")
"""The real swarm's rules (``oracle`` is simulator-only)."""
SIGN_NOISE = ("sign_flip", "noise")
SCREEN = (("plausibility", ft.MixingConfig.plausibility),)
"""The delayed attacker's second variant: learned trust behind the default plausibility screen."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One setting and one rule variant, run over every seed."""

    section: str
    dataset: str
    model: str
    split: str
    nodes: int
    variant: str
    clusters: int = 1
    alpha: float = 0.5
    topology: str = "complete"
    cohorts: bool = False
    attack: str | None = None
    attack_from: int = 0
    mixing: tuple[tuple[str, float], ...] = ()

    @property
    def rule(self) -> str:
        """The mixing rule: a variant's first word."""
        return self.variant.split()[0]

    def key(self, seeds: int, rounds: int | None) -> str:
        """A name unique to this cell, its seeds and its rounds (the JSON's key)."""
        parts = [self.section, self.dataset, self.model, self.split, f"n{self.nodes}"]
        parts += [f"K{self.clusters}"] if self.clusters > 1 else []
        parts += [f"a{self.alpha:g}"] if self.split == "noniid" else []
        parts += [self.topology + ("+trust" if self.cohorts else "")]
        parts += [f"{self.attack}@{self.attack_from}"] if self.attack else []
        return "/".join([*parts, self.variant, f"s{seeds}", f"r{self.rounds(rounds)}"])

    def rounds(self, rounds: int | None) -> int:
        """Rounds for this cell: the CNN's own, else ``rounds`` or the simulate default."""
        if self.model == "cnn":
            return CNN["rounds"] if rounds is None else min(rounds, CNN["rounds"])
        return ft.SimConfig().rounds if rounds is None else rounds

    def config(self, rounds: int | None) -> ft.SimConfig:
        """The cell's ``SimConfig`` at seed 0."""
        topology = ft.TopologyConfig(kind=self.topology, degree=COHORT)
        mixing = ft.MixingConfig(
            rule=self.rule,
            trust_cohorts=EXPLORATION if self.cohorts else None,
            plausibility=0.0 if self.attack else ft.MixingConfig.plausibility,
        )
        mixing = dataclasses.replace(mixing, **dict(self.mixing))
        config = ft.SimConfig(
            data=ft.DataConfig(
                dataset=self.dataset,
                num_nodes=self.nodes,
                split=self.split,
                clusters=self.clusters,
                alpha=self.alpha,
            ),
            model=ft.ModelConfig(name=self.model),
            mixing=mixing,
            topology=topology,
            rounds=self.rounds(rounds),
            eval_every=self.rounds(rounds),
            attack=self.attack,
            attackers=1 if self.attack else 0,
            attack_from=self.attack_from,
        )
        if self.model == "cnn":
            train = dataclasses.replace(config.train, steps=CNN["steps"])
            config = dataclasses.replace(config, train=train)
        return config


def _pick(
    grid: str, quick: bool, tiny: tuple[str, ...], full: tuple[str, ...], default: tuple[str, ...]
) -> tuple[str, ...]:
    """``tiny`` for ``--quick``, ``full`` for ``--grid full``, else ``default``."""
    return tiny if quick else full if grid == "full" else default


def clustered_cells(grid: str, quick: bool) -> Iterator[Cell]:
    """The clustered section's cells (see the module docstring)."""
    if quick:
        settings = [("digits", "logreg", "label_swap", 3, 6, t, c)
                    for t, c in (("complete", False), ("random_cohort", False),
                                 ("random_cohort", True))]  # fmt: skip
    elif grid == "full":
        settings = [
            (d, m, s, k, n, t, c)
            for d in ("mnist", "fashion-mnist")
            for m in ("logreg", "cnn")
            for s in ("label_swap", "rotated")
            for k in (2, 3, 4)
            for n in (12, 24)
            for t, c in (("complete", False), ("random_cohort", False), ("random_cohort", True))
        ]
    else:
        settings = []
        for d in ("mnist", "fashion-mnist"):
            settings += [(d, "logreg", "label_swap", k, 24, "complete", False) for k in (2, 3, 4)]
            settings += [
                (d, "logreg", "label_swap", 3, 12, "complete", False),
                (d, "logreg", "rotated", 3, 24, "complete", False),
                (d, "logreg", "label_swap", 3, 24, "random_cohort", False),
                (d, "logreg", "label_swap", 3, 24, "random_cohort", True),
            ]
    for dataset, model, split, k, nodes, topology, cohorts in settings:
        for rule in ("learned",) if cohorts else CLUSTER_RULES:
            yield Cell(
                "clustered", dataset, model, split, nodes, rule, clusters=k,
                topology=topology, cohorts=cohorts,
            )  # fmt: skip


def skew_cells(grid: str, quick: bool) -> Iterator[Cell]:
    """The label-skew section's cells."""
    datasets = _pick(grid, quick, ("digits",), ("mnist", "fashion-mnist"), ("mnist",))
    alphas = (0.1, 1.0) if quick else (0.1, 0.3, 1.0, 10.0)
    nodes = 6 if quick else 12
    for dataset in datasets:
        for alpha in alphas:
            for rule in SKEW_RULES:
                yield Cell("skew", dataset, "logreg", "noniid", nodes, rule, alpha=alpha)
            for name, setting in SKEW_VARIANTS.items():
                yield Cell(
                    "skew", dataset, "logreg", "noniid", nodes, name, alpha=alpha,
                    mixing=tuple(setting.items()),
                )  # fmt: skip


def attacker_cells(grid: str, quick: bool, rounds: int | None) -> Iterator[Cell]:
    """The delayed attacker's cells: attack from a third and two thirds of the rounds."""
    total = 4 if quick and rounds is None else ft.SimConfig().rounds if rounds is None else rounds
    datasets = _pick(grid, quick, ("digits",), ("mnist", "fashion-mnist"), ("mnist",))
    attacks = _pick(grid, quick, ("sign_flip",), ("sign_flip", "noise", "scale"), SIGN_NOISE)
    nodes = 6 if quick else 12
    for dataset in datasets:
        for attack in attacks:
            for start in sorted({max(1, total // 3), max(1, 2 * total // 3)}):
                yield Cell(
                    "attacker", dataset, "logreg", "iid", nodes, "learned",
                    attack=attack, attack_from=start,
                )  # fmt: skip
                yield Cell(
                    "attacker", dataset, "logreg", "iid", nodes, "learned + screen",
                    attack=attack, attack_from=start, mixing=SCREEN,
                )  # fmt: skip


def run_cell(cell: Cell, seeds: int, rounds: int | None) -> dict[str, Any]:
    """Run ``cell`` on seeds ``0 .. seeds-1``; per-seed node means of every score."""
    base = cell.config(rounds)
    tick = time.perf_counter()
    outcomes, _ = ft.simulate(
        [base.with_seed(s) for s in range(seeds)],
        out_dir=None,
        dataset=_data(cell.dataset),
        plots=False,
        progress=False,
    )
    per_seed: dict[str, list[float | None]] = {"accuracy": [], "own_accuracy": []}
    for outcome in outcomes:
        per_seed["accuracy"].append(100 * mean(outcome.accuracies))
        per_seed["own_accuracy"].append(100 * mean(float(r["own_accuracy"]) for r in outcome.final))
        if "cluster_share" in outcome.final[0]:
            shares = [float(r["cluster_share"]) for r in outcome.final]
            per_seed.setdefault("cluster_share", []).append(mean(shares))
        if outcome.security is not None:
            security = outcome.security
            per_seed.setdefault("rounds_to_exclusion", []).append(security["rounds_to_exclusion"])
            per_seed.setdefault("honest_accuracy", []).append(
                100 * float(security["honest_accuracy_mean"])
            )
    result = {
        "cell": {k: v for k, v in dataclasses.asdict(cell).items() if k != "mixing"}
        | {"mixing": dict(cell.mixing), "rounds": base.rounds, "seeds": seeds},
        "per_seed": per_seed,
        "seconds": time.perf_counter() - tick,
    }
    if cell.section == "clustered" and outcomes[0].weights is not None:
        result["weights"] = [[round(w, 4) for w in row] for row in outcomes[0].weights]
    return result


SWARM: dict[str, Any] = {"dataset": "mnist", "split": "label_swap", "clusters": 3, "nodes": 12}
"""The real swarm's setting: the simulator's MNIST label_swap K=3 cell at 12 nodes."""
SWARM_QUICK: dict[str, Any] = {
    "dataset": "digits",
    "split": "label_swap",
    "clusters": 2,
    "nodes": 4,
}


def swarm_cells(quick: bool) -> Iterator[Cell]:
    """The real swarm's cells: one per rule, every peer in every other's cohort (complete)."""
    setting = SWARM_QUICK if quick else SWARM
    for rule in SWARM_RULES:
        yield Cell("swarm", model="logreg", variant=rule, **setting)


def run_swarm_cell(cell: Cell, rounds: int | None, work: Path) -> dict[str, Any]:
    """One real swarm of ``cell.nodes`` peer processes on loopback (seed 0).

    Its own-distribution accuracy is the peers' mean test accuracy (a clustered peer's test set
    is its cluster's transform); its share is each peer's self weight plus its weights on peers
    of its cluster in its last round, averaged over the peers.
    """
    from fedtorrent.cli.net import create  # noqa: PLC0415  (the CLI body: only this section)
    from fedtorrent.node.swarm import SwarmConfig, run_swarm  # noqa: PLC0415

    folder = work / cell.key(1, rounds).replace("/", "_")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torrent = folder / "session.torrent"
    create(
        output=torrent, dataset=cell.dataset, model=cell.model, nodes=cell.nodes,
        split=cell.split, clusters=cell.clusters, rounds=cell.rounds(rounds),
        cohort=cell.nodes - 1, mixing=cell.rule,
    )  # type: ignore[arg-type]  # fmt: skip
    tick = time.perf_counter()
    config = SwarmConfig(
        torrent=torrent, out=folder / "swarm", peers=cell.nodes,
        data_dir=Path(os.environ.get("FEDTORRENT_DATA", "../shared/data")), exchange_timeout=60,
    )  # fmt: skip
    summary = run_swarm(config, timeout=3600, plots=False, progress=False)
    shares = []
    for metrics in sorted((folder / "swarm" / "peers").glob("*/metrics.jsonl")):
        last = read_records(metrics)[-1]
        own = _index(last["peer_id"]) % cell.clusters
        inside = sum(
            float(w)
            for peer, w in (last.get("trust_weights") or {}).items()
            if peer != "self" and _index(peer) % cell.clusters == own
        )
        shares.append(float(last.get("self_weight") or 0.0) + inside)
    return {
        "cell": dataclasses.asdict(cell) | {"rounds": cell.rounds(rounds), "seeds": 1},
        "per_seed": {
            "own_accuracy": [100 * float(summary["test_accuracy_mean"])],
            "cluster_share": [mean(shares)] if shares else [],
        },
        "finished": summary["finished"],
        "seconds": time.perf_counter() - tick,
    }


def _index(peer_id: str) -> int:
    """A launched peer's node index from its id (``peer-7`` -> 7)."""
    return int(peer_id.rsplit("-", 1)[1])


def heatmaps(record: dict[str, Any], plots: Path) -> list[Path]:
    """Draw the last weights (seed 0) of the largest complete-graph label_swap K=3 setting.

    One PNG per rule of ``HEATMAP_RULES``, nodes ordered by cluster so that trust inside a
    cluster shows as diagonal blocks; an earlier dataset wins a tie in size.
    """
    cells = [
        c
        for c in record["cells"].values()
        if c["cell"]["section"] == "clustered"
        and "weights" in c
        and (c["cell"]["split"], c["cell"]["clusters"], c["cell"]["topology"])
        == ("label_swap", 3, "complete")
    ]
    if not cells:
        return []
    setting = _setting(max(cells, key=lambda c: c["cell"]["nodes"])["cell"])
    paths = []
    for c in cells:
        cell = c["cell"]
        if _setting(cell) != setting or cell["variant"] not in HEATMAP_RULES:
            continue
        n, k = cell["nodes"], cell["clusters"]
        order = sorted(range(n), key=lambda i: (i % k, i))
        weights = [[c["weights"][i][j] for j in order] for i in order]
        title = f"{cell['variant']}: {cell['dataset']} label_swap K={k}, {n} nodes, seed 0"
        paths.append(
            plot_weights(
                weights,
                plots / f"trust_clustered_{cell['variant']}.png",
                names=[f"{i}:c{i % k}" for i in order],
                title=title,
            )
        )
    return paths


_DATA: dict[str, Any] = {}


def _data(name: str) -> Any:
    if name not in _DATA:
        _DATA[name] = load_for(ft.SimConfig(data=ft.DataConfig(dataset=name)))
    return _DATA[name]


def _stat(values: list[float | None] | None, digits: int = 2) -> str:
    """``mean ± std`` over the seeds' values (population std; one seed shows ± 0)."""
    if not values:
        return "-"
    present = [float(v) for v in values if v is not None]
    if not present:
        return "never"
    text = f"{mean(present):.{digits}f} ± {pstdev(present):.{digits}f}"
    missing = len(values) - len(present)
    return text + (f" ({missing} never)" if missing else "")


def _setting(cell: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(
        cell[k] for k in ("dataset", "model", "split", "clusters", "nodes", "alpha", "rounds")
    )


def _gap_closed(rows: dict[tuple[Any, ...], dict[str, dict[str, Any]]]) -> list[str]:
    """Lines saying how much of the gap from random to complete trust-guided cohorts close.

    The gap is learned trust's own-distribution accuracy on the complete graph minus on random
    cohorts; the share closed is (trust cohorts - random) / gap, from the means over seeds.
    """
    learned: dict[tuple[Any, ...], dict[str, float]] = {}
    for (*setting, topology), by_rule in rows.items():
        if "learned" in by_rule:
            value = mean(float(v) for v in by_rule["learned"]["own_accuracy"])
            learned.setdefault(tuple(setting), {})[topology] = value
    lines = []
    for (dataset, model, split, k, nodes, _, rounds), by_topology in learned.items():
        names = ("complete", "random_cohort", "random_cohort + trust cohorts")
        if not all(name in by_topology for name in names):
            continue
        complete, random, guided = (by_topology[name] for name in names)
        gap = complete - random
        closed = f"{(guided - random) / gap:.0%}" if gap > 0 else "no gap"
        lines.append(
            f"- {dataset} {model} {split} K={k}, {nodes} nodes, {rounds} rounds: learned own "
            f"accuracy complete {complete:.2f}, random cohorts of {COHORT} {random:.2f}, "
            f"trust-guided {guided:.2f}: share of the gap closed {closed}."
        )
    return ["", "Trust-guided cohorts against the gap:", "", *lines] if lines else []


def report(record: dict[str, Any], pictures: list[str] | None = None) -> str:
    """``results/trust.md`` from the JSON record; ``pictures`` names the heatmaps drawn."""
    cells = list(record["cells"].values())
    lines = [
        "# Where learned trust matters",
        "",
        "Produced by `python experiments/trust_study.py` (module docstring: grids and options). "
        "Cells: mean ± std over seeds of the per-seed mean over nodes; accuracies in %. "
        "*own*: each node's accuracy on its own distribution (its cluster's transform of the "
        "test set, or its label mix); *share*: the part of its mixing weight inside its true "
        "cluster after the last round.",
    ]
    clustered = [c for c in cells if c["cell"]["section"] == "clustered"]
    if clustered:
        lines += ["", "## Clustered peers", ""]
        head = "| dataset | model | split | K | nodes | rounds | topology |"
        head += "".join(f" {r} own |" for r in CLUSTER_RULES) + " learned share | fedfomo share |"
        lines += [head, "|---" * 7 + "|" + "---:|" * (len(CLUSTER_RULES) + 2)]
        rows: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
        for c in clustered:
            cell = c["cell"]
            topology = cell["topology"] + (" + trust cohorts" if cell["cohorts"] else "")
            rows.setdefault((*_setting(cell), topology), {})[cell["variant"]] = c["per_seed"]
        for (dataset, model, split, k, nodes, _, rounds, topology), by_rule in rows.items():
            own = [_stat(by_rule.get(r, {}).get("own_accuracy")) for r in CLUSTER_RULES]
            share = [
                _stat(by_rule.get(r, {}).get("cluster_share"), 3) for r in ("learned", "fedfomo")
            ]
            lines.append(
                f"| {dataset} | {model} | {split} | {k} | {nodes} | {rounds} | {topology} | "
                + " | ".join(own + share)
                + " |"
            )
        lines += [
            "",
            "Trust-guided cohorts choose by learned trust's logits, so their rows have learned "
            "trust only: fedfomo recomputes its weights each round from validation losses and "
            "keeps no score to choose by, and the other rules learn nothing about their peers.",
        ]
        lines += _gap_closed(rows)
        if pictures:
            lines += ["", "Last-round weights (seed 0), nodes ordered by cluster: "]
            lines[-1] += ", ".join(f"`{name}`" for name in pictures) + "."
    skew = [c for c in cells if c["cell"]["section"] == "skew"]
    if skew:
        lines += [
            "",
            "## Label skew (Dirichlet)",
            "",
            "Global: accuracy on the whole test set; own: on the node's label mix. The floor and "
            "entropy rows hold learned trust closer to uniform: the personalization-"
            "generalization trade-off.",
            "",
            "| dataset | alpha | nodes | rounds | rule | global | own |",
            "|---|---:|---:|---:|---|---:|---:|",
        ]
        for c in skew:
            cell, per_seed = c["cell"], c["per_seed"]
            lines.append(
                f"| {cell['dataset']} | {cell['alpha']:g} | {cell['nodes']} | {cell['rounds']} | "
                f"{cell['variant']} | {_stat(per_seed['accuracy'])} | "
                f"{_stat(per_seed['own_accuracy'])} |"
            )
    attacker = [c for c in cells if c["cell"]["section"] == "attacker"]
    if attacker:
        lines += [
            "",
            "## The delayed attacker",
            "",
            f"One attacker among the nodes shares honestly before round R, then attacks. "
            f"*learned*: learned trust with the plausibility screen off, so that trust alone must "
            f"react; *learned + screen*: behind the default screen. Rounds to exclusion: from "
            f"round R, rounds until its weight stays below {EXCLUDED} (1 = in the first attacked "
            f"round).",
            "",
            "| dataset | attack | nodes | rounds | R | rule | rounds to exclusion | "
            "honest accuracy |",
            "|---|---|---:|---:|---:|---|---:|---:|",
        ]
        for c in attacker:
            cell, per_seed = c["cell"], c["per_seed"]
            lines.append(
                f"| {cell['dataset']} | {cell['attack']} | {cell['nodes']} | {cell['rounds']} | "
                f"{cell['attack_from']} | {cell['variant']} | "
                f"{_stat(per_seed.get('rounds_to_exclusion'), 1)} | "
                f"{_stat(per_seed.get('honest_accuracy'))} |"
            )
    swarm = [c for c in cells if c["cell"]["section"] == "swarm"]
    if swarm:
        lines += _swarm_table(swarm, clustered)
    seconds = sum(float(c["seconds"]) for c in cells)
    lines += ["", f"Run time of the cells shown: {seconds / 60:.1f} minutes."]
    return "\n".join(lines) + "\n"


def _swarm_table(swarm: list[dict[str, Any]], clustered: list[dict[str, Any]]) -> list[str]:
    """The real-swarm rows, each beside the simulator's cell of the same setting and rule."""
    simulated = {(*_setting(c["cell"]), c["cell"]["variant"]): c for c in clustered
                 if c["cell"]["topology"] == "complete"}  # fmt: skip
    lines = [
        "",
        "## A real swarm next to the simulator",
        "",
        "Real `fedtorrent peer` processes on loopback (seed 0, every peer in every other's "
        "cohort) against the simulator's complete graph on the same split. Own: the peers' mean "
        "own-distribution test accuracy; share: self weight plus weight on peers of the same "
        "cluster, last round.",
        "",
        "| dataset | split | K | peers | rounds | rule | swarm own | swarm share | "
        "simulator own, seed 0 | simulator own, all seeds | swarm minutes |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for c in swarm:
        cell, per_seed = c["cell"], c["per_seed"]
        twin = simulated.get((*_setting(cell), cell["variant"]))
        first = f"{twin['per_seed']['own_accuracy'][0]:.2f}" if twin else "-"
        every = _stat(twin["per_seed"]["own_accuracy"]) if twin else "-"
        share = f"{per_seed['cluster_share'][0]:.3f}" if per_seed["cluster_share"] else "-"
        lines.append(
            f"| {cell['dataset']} | {cell['split']} | {cell['clusters']} | {cell['nodes']} | "
            f"{cell['rounds']} | {cell['variant']} | {per_seed['own_accuracy'][0]:.2f} | "
            f"{share} | {first} | {every} | {float(c['seconds']) / 60:.1f} |"
        )
    return lines


def main() -> None:
    """Parse the options, run the missing cells, write the JSON after each and the markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--rounds", type=int, default=None, help="default: simulate's 50")
    parser.add_argument("--grid", choices=("default", "full"), default="default")
    parser.add_argument("--quick", action="store_true", help="digits, 6 nodes, 4 rounds, 1 seed")
    parser.add_argument("--resume", action="store_true", help="skip cells already in the JSON")
    parser.add_argument("--out", type=Path, default=None, help="default results/")
    parser.add_argument(
        "--work", type=Path, default=Path("runs/trust_swarm"), help="the real swarms' folders"
    )
    args = parser.parse_args()
    seeds = args.seeds or (1 if args.quick else 3)
    rounds = args.rounds if args.rounds is not None or not args.quick else 4
    if seeds < 1 or (rounds is not None and rounds < 1):
        parser.error("--seeds and --rounds must be >= 1")
    out = args.out or Path("runs/trust_quick" if args.quick else "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "trust.json"
    record: dict[str, Any] = (
        json.loads(path.read_text()) if path.exists() else {"cells": {}}
    )  # fmt: skip
    cells: list[Cell] = []
    if "clustered" in args.only:
        cells += clustered_cells(args.grid, args.quick)
    if "skew" in args.only:
        cells += skew_cells(args.grid, args.quick)
    if "attacker" in args.only:
        cells += attacker_cells(args.grid, args.quick, rounds)
    if "swarm" in args.only:
        cells += swarm_cells(args.quick)
    for index, cell in enumerate(cells, start=1):
        swarm = cell.section == "swarm"
        key = cell.key(1 if swarm else seeds, rounds)
        if args.resume and key in record["cells"]:
            continue
        print(f"[{index}/{len(cells)}] {key}", flush=True)
        if swarm:
            record["cells"][key] = run_swarm_cell(cell, rounds, args.work)
        else:
            record["cells"][key] = run_cell(cell, seeds, rounds)
        write_json(path, record)
    write_json(path, record)
    pictures = [str(p.relative_to(out)) for p in heatmaps(record, out / "plots")]
    text = report(record, pictures)
    (out / "trust.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
