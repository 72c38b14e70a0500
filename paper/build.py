"""Build the explanatory paper, ``paper/fedtorrent.pdf``, from ``paper/fedtorrent.typ``.

Every number and figure in the paper comes from the committed results (``results/*.json``,
``benchmarks/results/*.json``, ``results/plots/*.png`` and the reproduction's run plots): this
script reads them, formats the numbers and hands them to Typst as one JSON string
(``sys.inputs.numbers``); the Typst source types none. A results file, key or figure that is
missing stops the build with one line naming it.

Usage: ``python paper/build.py [OUTPUT.pdf] [--root REPO]`` (``make paper``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SOURCE = "paper/fedtorrent.typ"
OUTPUT = "paper/fedtorrent.pdf"

RESULT_FILES = (
    "results/reproduce.json",
    "results/table3_seeds.json",
    "results/trust.json",
    "results/attacks.json",
    "results/extreme.json",
    "results/sybil.json",
    "results/privacy.json",
    "results/bandwidth.json",
    "results/churn.json",
    "results/stragglers.json",
    "results/opentracker.json",
    "benchmarks/results/swarm_scale.json",
    "benchmarks/results/sim_speed.json",
)
"""Every results file the paper reads, in the order the build reads them."""

FIGURES = {
    "nodes": "results/plots/nodes.png",
    "rounds_fmnist_iid": "results/runs/fashion-mnist-iid/plots/accuracy.png",
    "rounds_mnist_noniid": "results/runs/mnist-noniid/plots/accuracy.png",
    "trust_fixed": "results/plots/trust_clustered_fixed.png",
    "trust_learned": "results/plots/trust_clustered_learned.png",
    "trust_fedfomo": "results/plots/trust_clustered_fedfomo.png",
    "trust_heatmap": "results/plots/trust_heatmap.png",
    "bandwidth_accuracy": "results/plots/bandwidth_accuracy.png",
    "bandwidth_scale": "results/plots/bandwidth_scale.png",
}
"""The figures the paper shows, by the name the Typst source uses."""


class MissingResultError(Exception):
    """A results file, key or figure the paper needs is not there; the message is one line."""


class Results:
    """The committed results under one repository root, read once each, checked on access."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._loaded: dict[str, Any] = {}

    def get(self, name: str, *keys: str | int) -> Any:
        """The value at ``keys`` inside results file ``name`` (a path relative to the root).

        Raises:
            MissingResultError: the file is missing or not JSON, or a key is absent.
        """
        if name not in self._loaded:
            path = self.root / name
            if not path.is_file():
                raise MissingResultError(f"paper: missing results file {name}")
            try:
                self._loaded[name] = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise MissingResultError(f"paper: {name} is not valid JSON ({exc})") from exc
        value = self._loaded[name]
        for depth, key in enumerate(keys):
            try:
                value = value[key]
            except (KeyError, IndexError, TypeError):
                where = " > ".join(str(k) for k in keys[: depth + 1])
                raise MissingResultError(f"paper: {name} has no key {where}") from None
        return value

    def figure(self, path: str) -> str:
        """``path`` as Typst reads it from the root (``/results/...``), once it is there."""
        if not (self.root / path).is_file():
            raise MissingResultError(f"paper: missing figure {path}")
        return "/" + path


def fixed(value: float, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals; a minus sign, not a hyphen, when negative."""
    return f"{value:.{digits}f}".replace("-", "\u2212")


def signed(value: float, digits: int = 2) -> str:
    """``value`` with an explicit sign (``+0.30``, ``\u22120.06``)."""
    return f"{value:+.{digits}f}".replace("-", "\u2212")


def pct(fraction: float, digits: int = 2) -> str:
    """A fraction in [0, 1] as percent with ``digits`` decimals (no % sign)."""
    return fixed(100 * fraction, digits)


def pm(mean: float, std: float, digits: int = 2) -> str:
    """``mean ± std``."""
    return f"{fixed(mean, digits)} \u00b1 {fixed(std, digits)}"


def over_seeds(values: Sequence[float], digits: int = 2) -> str:
    """Mean ± population std over seeds, as results/trust.md writes them."""
    return pm(statistics.mean(values), statistics.pstdev(values), digits)


def seed_paper(mean: float, std: float) -> str:
    """A seed-paper cell as that paper prints it: one decimal of mean, two of std."""
    return f"{fixed(mean, 1)} \u00b1 {fixed(std, 2)}"


MIB = 1024 * 1024
DASH = "\u2013"


# --- the seed paper's tables -----------------------------------------------------------------


def reproduction(r: Results) -> dict[str, Any]:
    """Tables 1-3 beside the seed paper's numbers, the node sweep and the plan's settings."""
    name = "results/reproduce.json"
    plan = r.get(name, "plan")
    splits = {"iid": "iid balanced", "noniid": "non-iid balanced", "unbalanced": "iid unbalanced"}
    tables = {}
    for dataset in ("mnist", "fashion-mnist"):
        rows = []
        for split, label in splits.items():
            cell = r.get(name, "tables", dataset, split)
            paper_mean, paper_std = r.get(name, "paper", "tables", dataset, split)
            by_rule = {
                rule: pm(100 * cell[rule]["accuracy_mean"], 100 * cell[rule]["accuracy_std"])
                for rule in ("none", "fixed", "learned")
            }
            best = max(100 * cell[rule]["accuracy_mean"] for rule in ("fixed", "learned"))
            seed = seed_paper(paper_mean, paper_std)
            rows.append([label, seed, *by_rule.values(), signed(best - paper_mean)])
            if split == "noniid":
                own = [
                    pm(
                        100 * r.get(name, "tables", dataset, split, rule, "own_accuracy_mean"),
                        100 * r.get(name, "tables", dataset, split, rule, "own_accuracy_std"),
                    )
                    for rule in ("none", "fixed", "learned")
                ]
                rows.append(["  own label mix", "\u2013", *own, ""])
        central = r.get(name, "centralized", dataset)
        tables[dataset] = {
            "rows": rows,
            "central": pm(central["accuracy_mean"], central["accuracy_std"]),
        }
    table3 = []
    fmnist_iid = r.get(name, "tables", "fashion-mnist", "iid")
    labels = {"none": "no sharing", "fixed": "fixed sharing", "learned": "learned sharing"}
    for rule, label in labels.items():
        paper_mean, paper_std = r.get(name, "paper", "table3", rule)
        ours = 100 * fmnist_iid[rule]["accuracy_mean"]
        table3.append(
            [
                label,
                seed_paper(paper_mean, paper_std),
                pm(ours, 100 * fmnist_iid[rule]["accuracy_std"]),
                signed(ours - paper_mean),
            ]
        )
    points = r.get(name, "sweep", "points")
    sweep = [
        [
            str(n),
            *(pm(points[rule][i][1], points[rule][i][2]) for rule in ("none", "fixed", "learned")),
        ]
        for i, (n, _, _) in enumerate(points["fixed"])
    ]
    train = plan["train"]
    mixing = plan["mixing"]
    return {
        "tables": tables,
        "table3": table3,
        "sweep": sweep,
        "sweep_degree": str(r.get(name, "sweep", "topology", "degree")),
        "sweep_nodes": [str(p[0]) for p in points["fixed"]],
        "nodes": str(plan["num_nodes"]),
        "rounds": str(plan["rounds"]),
        "seeds": str(len(plan["seeds"])),
        "batch": str(train["batch_size"]),
        "lr": str(train["lr"]),
        "trust_lr": str(mixing["trust_lr"]),
        "trust_steps": str(mixing["trust_steps"]),
        "trust_batch": str(mixing["trust_batch_size"]),
        "minutes": fixed(r.get(name, "seconds", "total") / 60, 1),
    }


def table3_seeds(r: Results) -> dict[str, Any]:
    """Table 3's setting over many seeds: the paired learned - fixed difference."""
    name = "results/table3_seeds.json"
    pair = r.get(name, "pairs", "learned-fixed")
    per_seed = r.get(name, "per_seed")
    return {
        "seeds": str(len(r.get(name, "seeds"))),
        "none": fixed(statistics.mean(per_seed["none"])),
        "fixed": fixed(statistics.mean(per_seed["fixed"])),
        "learned": fixed(statistics.mean(per_seed["learned"])),
        "diff": signed(pair["mean"], 3),
        "low": signed(pair["low"], 3),
        "high": signed(pair["high"], 3),
        "wins": str(pair["wins"]),
        "fixed_none": signed(r.get(name, "pairs", "fixed-none", "mean"), 2),
    }


# --- learned trust where it matters ------------------------------------------------------------


def trust(r: Results) -> dict[str, Any]:
    """Clustered peers, label skew, the delayed attacker and the real clustered swarm."""
    name = "results/trust.json"

    def cell(key: str) -> dict[str, Any]:
        return dict(r.get(name, "cells", key))

    def own(key: str) -> str:
        return over_seeds(cell(key)["per_seed"]["own_accuracy"])

    clustered = []
    for dataset in ("mnist", "fashion-mnist"):
        for split, nodes, k, topology in (
            ("label_swap", 24, 2, "complete"),
            ("label_swap", 24, 3, "complete"),
            ("label_swap", 24, 4, "complete"),
            ("rotated", 24, 3, "complete"),
            ("label_swap", 24, 3, "random_cohort"),
        ):
            base = f"clustered/{dataset}/logreg/{split}/n{nodes}/K{k}/{topology}"
            row = [dataset, split.replace("_", " "), str(k), topology.replace("_", " ")]
            row += [own(f"{base}/{rule}/s3/r50") for rule in ("none", "fixed", "learned")]
            row += [own(f"{base}/{rule}/s3/r50") for rule in ("fedfomo", "oracle")]
            share = cell(f"{base}/learned/s3/r50")["per_seed"]["cluster_share"]
            row.append(fixed(statistics.mean(share), 3))
            clustered.append(row)
        trusted = f"clustered/{dataset}/logreg/label_swap/n24/K3/random_cohort+trust/learned/s3/r50"
        share = cell(trusted)["per_seed"]["cluster_share"]
        clustered.append(
            [
                dataset,
                "label swap",
                "3",
                "trust cohorts",
                DASH,
                DASH,
                own(trusted),
                DASH,
                DASH,
                fixed(statistics.mean(share), 3),
            ]
        )
    skew_rules = ("none", "fixed", "learned", "learned floor=0.05", "learned entropy=0.2")
    alphas = ("0.1", "1", "10")
    skew = []
    for rule in skew_rules:
        row = [rule]
        for alpha in alphas:
            seeds = cell(f"skew/mnist/logreg/noniid/n12/a{alpha}/complete/{rule}/s3/r50")[
                "per_seed"
            ]
            row += [over_seeds(seeds["accuracy"]), over_seeds(seeds["own_accuracy"])]
        skew.append(row)
    delayed = []
    for attack in ("noise", "sign_flip"):
        for start in (16, 33):
            for rule in ("learned", "learned + screen"):
                seeds = cell(
                    f"attacker/mnist/logreg/iid/n12/complete/{attack}@{start}/{rule}/s3/r50"
                )["per_seed"]
                rounds = seeds["rounds_to_exclusion"]
                excluded = "never" if any(v is None for v in rounds) else over_seeds(rounds, 1)
                delayed.append(
                    [
                        attack.replace("_", " "),
                        str(start),
                        rule,
                        excluded,
                        over_seeds(seeds["honest_accuracy"]),
                    ]
                )
    swarm = []
    for rule in ("fixed", "learned", "fedfomo"):
        live = cell(f"swarm/mnist/logreg/label_swap/n12/K3/complete/{rule}/s1/r50")["per_seed"]
        sim = cell(f"clustered/mnist/logreg/label_swap/n12/K3/complete/{rule}/s3/r50")["per_seed"]
        swarm.append(
            [
                rule,
                fixed(live["own_accuracy"][0]),
                fixed(live["cluster_share"][0], 3),
                fixed(sim["own_accuracy"][0]),
            ]
        )
    return {
        "clustered": clustered,
        "skew": skew,
        "skew_alphas": list(alphas),
        "delayed": delayed,
        "swarm": swarm,
    }


# --- attacks -----------------------------------------------------------------------------------


def attacks(r: Results) -> dict[str, Any]:
    """Poisoning against every rule, extreme values, and the sybil flood."""
    name = "results/attacks.json"
    rules = ("learned", "fixed", "median", "trimmed_mean", "krum")

    def honest(scenario: str, rule: str) -> float:
        entry = r.get(name, scenario, "by_mixing", rule)
        security = entry.get("security")
        return float(security["honest_accuracy_mean"] if security else entry["accuracy_mean"])

    poisoning = []
    for scenario, clean in (
        ("6 nodes, 1 sign_flip", "6 nodes, no attack"),
        ("6 nodes, 2 sign_flip", "6 nodes, no attack"),
        ("6 nodes, 2 label_flip", "6 nodes, no attack"),
        ("6 nodes, 2 free_rider", "6 nodes, no attack"),
        ("6 nodes, 2 noise", "6 nodes, no attack"),
        ("50 nodes, 10 sign_flip", "50 nodes, no attack"),
    ):
        row = [scenario.replace("_", " ")]
        present = r.get(name, scenario, "by_mixing")
        for rule in rules:
            if rule not in present:
                row.append("\u2013")
                continue
            accuracy = honest(scenario, rule)
            delta = 100 * (accuracy - honest(clean, rule))  # as results/attacks.md computes it
            row.append(f"{pct(accuracy)} ({signed(delta)})")
        weight = r.get(name, scenario, "by_mixing", "learned", "security", "weight_to_attackers")
        row.append(fixed(weight, 4))
        poisoning.append(row)
    clean_row = ["no attack", *(pct(honest("6 nodes, no attack", rule)) for rule in rules), ""]

    extreme_name = "results/extreme.json"
    extreme_rules = ("none", "fixed", "learned", "median", "trimmed_mean", "krum")
    extreme = []
    for attack in (
        "clean",
        "extreme 3e+38",
        "extreme_mixed 1e+10",
        "extreme 1e+10, screen off",
        "extreme 3e+38, screen off",
    ):
        row = [attack.replace("_", " ")]
        for rule in extreme_rules:
            value = r.get(
                extreme_name, "simulator", attack, "by_mixing", rule, "honest_accuracy_mean"
            )
            row.append(pct(value))
        extreme.append(row)
    swarm_extreme = []
    for attack in ("clean", "extreme 3e+38", "extreme 1e+10, screen off"):
        peers = r.get(extreme_name, "swarm", attack, "honest")
        accuracy = statistics.mean(float(p["test_accuracy"]) for p in peers)
        weight = max(float(p["max_weight_on_peer_3"]) for p in peers)
        swarm_extreme.append(
            [
                attack.replace("_", " "),
                f"{r.get(extreme_name, 'swarm', attack, 'finished')}",
                pct(accuracy),
                fixed(weight, 3),
            ]
        )

    sybil_name = "results/sybil.json"
    sybil = []
    for run, label in (
        ("clean", "clean"),
        ("flooded", "flooded, cap 8 ids per address"),
        ("flooded-no-cap", "flooded, no cap"),
    ):
        entry = r.get(sybil_name, run)
        listed = "0" if run == "clean" else str(entry["fakes_accepted"])
        sybil.append(
            [
                label,
                listed,
                fixed(entry["honest_heard_per_round"]),
                f"{entry['rounds_without_honest']} of {entry['peer_rounds']}",
                pct(entry["test_accuracy_mean"]),
            ]
        )
    return {
        "poisoning": poisoning,
        "clean": clean_row,
        "extreme": extreme,
        "swarm_extreme": swarm_extreme,
        "sybil": sybil,
        "sybil_fakes": str(r.get(sybil_name, "fakes")),
        "sybil_sources": str(r.get(sybil_name, "sources")),
        "sybil_rounds": str(r.get(sybil_name, "rounds")),
        "sybil_gap": fixed(r.get(sybil_name, "flooded", "accuracy_gap_points")),
    }


# --- privacy -----------------------------------------------------------------------------------


def privacy(r: Results) -> dict[str, Any]:
    """Accuracy against epsilon: example-level, node-level, centralized, and the real swarm."""
    name = "results/privacy.json"
    epsilons = ("off", "eps0.5", "eps1", "eps2", "eps4", "eps8")

    def accuracy(key: str) -> str:
        return fixed(statistics.mean(r.get(name, "cells", key, "accuracy")))

    rows = []
    for dataset in ("mnist", "fashion-mnist"):
        for label, prefix, rule, nodes in (
            ("example-level, fixed", "example", "fixed", 6),
            ("example-level, learned", "example", "learned", 6),
            ("node-level, fixed", "node", "fixed", 6),
            ("centralized DP-SGD", "central", "none", 1),
        ):
            row = [dataset, label]
            for eps in epsilons:
                if prefix == "node" and eps == "off":
                    row.append("\u2013")
                    continue
                row.append(accuracy(f"{prefix}/{dataset}/logreg/n{nodes}/{rule}/{eps}/s1/r30"))
            rows.append(row)
    swarm = r.get(name, "cells", "swarm/mnist/logreg/n6/fixed/eps1/s1/r30")
    clean = statistics.mean(
        r.get(name, "cells", "example/mnist/logreg/n6/fixed/off/s1/r30", "accuracy")
    )
    private = statistics.mean(
        r.get(name, "cells", "example/mnist/logreg/n6/fixed/eps1/s1/r30", "accuracy")
    )
    return {
        "dp_cost": fixed(clean - private),
        "rows": rows,
        "swarm_accuracy": fixed(swarm["accuracy"][0]),
        "swarm_epsilon": fixed(swarm["epsilon"][0], 3),
        "sim_accuracy": accuracy("example/mnist/logreg/n6/fixed/eps1/s1/r30"),
        "cnn_off": accuracy("example/mnist/cnn/n6/fixed/off/s1/r10"),
        "cnn_eps1": accuracy("example/mnist/cnn/n6/fixed/eps1/s1/r10"),
        "cnn_eps8": accuracy("example/mnist/cnn/n6/fixed/eps8/s1/r10"),
    }


# --- bandwidth ---------------------------------------------------------------------------------


def bandwidth(r: Results) -> dict[str, Any]:
    """The real swarm's bytes by codec beside the measured server, the simulator, and scaling."""
    name = "results/bandwidth.json"
    none_bytes = r.get(name, "swarm", "runs", "none", "p2p_bytes")
    swarm = []
    for key, label in (
        ("none", "none"),
        ("int8", "int8"),
        ("topk:0.1,int8", "top-k 0.1 + int8"),
        ("topk:0.05,int8", "top-k 0.05 + int8"),
        ("central", "central server"),
    ):
        run = r.get(name, "swarm", "runs", key)
        server = "\u2013" if run["server_bytes"] is None else fixed(run["server_bytes"] / MIB)
        swarm.append(
            [
                label,
                pm(100 * run["accuracy_mean"], 100 * run["accuracy_std"]),
                fixed(run["p2p_bytes"] / MIB),
                fixed(run["tracker_bytes"] / 1024, 1),
                server,
                fixed(run["p2p_bytes"] / none_bytes, 3),
                fixed(run["p2p_bytes"] / run["peer_rounds"] / 1024, 1),
            ]
        )
    sim = []
    codecs = r.get(name, "sim", "mnist/logreg", "codecs")
    for codec in ("none", "fp16", "int8", "topk:0.1", "topk:0.1,int8", "topk:0.01,int8"):
        entry = r.get(name, "sim", "mnist/logreg", "codecs", codec)
        sim.append(
            [
                codec,
                pm(100 * entry["accuracy_mean"], 100 * entry["accuracy_std"]),
                fixed(entry["bytes_per_peer_round"] / 1024, 1),
                fixed(entry["bytes_per_peer_round"] / codecs["none"]["bytes_per_peer_round"], 3),
            ]
        )
    scale = []
    for entry in r.get(name, "scale", "peers"):
        if entry["nodes"] not in (6, 24, 96):
            continue
        scale.append(
            [
                str(entry["nodes"]),
                entry["topology"].replace("_", " "),
                entry["codec"],
                fixed(entry["p2p_bytes"] / MIB),
                fixed(entry["central_server_bytes"] / MIB),
                fixed(entry["p2p_bytes"] / entry["central_server_bytes"], 3),
            ]
        )
    done = r.get(name, "swarm", "done_when")
    return {
        "swarm": swarm,
        "sim": sim,
        "scale": scale,
        "swarm_rounds": str(r.get(name, "swarm", "rounds")),
        "sim_rounds": str(r.get(name, "sim", "mnist/logreg", "rounds")),
        "int8_ratio": fixed(done["int8_bytes_ratio"], 3),
        "int8_points": signed(done["int8_accuracy_points"]),
        "topk_vs_server": fixed(done["topk:0.1,int8_bytes_vs_server"], 3),
        "topk_points": signed(done["topk:0.1,int8_accuracy_points"]),
        "server_mib": fixed(r.get(name, "swarm", "runs", "central", "server_bytes") / MIB),
        "formula_mib": fixed(
            r.get(name, "swarm", "runs", "central", "central_formula_bytes") / MIB
        ),
    }


# --- scale and churn ---------------------------------------------------------------------------


def scale(r: Results) -> dict[str, Any]:
    """Real swarms of 6-200 peers, churn, stragglers and a standard BitTorrent tracker."""
    name = "benchmarks/results/swarm_scale.json"
    rows = [
        [
            str(row["peers"]),
            str(row["processes"]),
            f"{row['finished']}/{row['peers']}",
            fixed(row["wall_seconds"], 1),
            fixed(row["peak_memory_bytes"] / 2**30, 2),
            fixed(row["memory_per_peer_bytes"] / MIB, 1),
            pct(row["swarm_accuracy"]),
            pct(row["sim_accuracy"]),
        ]
        for row in r.get(name, "rows")
    ]
    churn_name = "results/churn.json"
    churn_runs = r.get(churn_name, "runs")
    churn = {
        "peers": str(r.get(churn_name, "peers")),
        "rounds": str(r.get(churn_name, "rounds")),
        "spec": str(r.get(churn_name, "churn")),
        "steady": pct(r.get(churn_name, "runs", "steady", "survivor_accuracy_mean")),
        "churned": pct(r.get(churn_name, "runs", "churn", "survivor_accuracy_mean")),
        "survivors": "{survivors_finished}/{survivors}".format(**churn_runs["churn"]),
        "gap": signed(r.get(churn_name, "accuracy_gap_points")),
        "joiners": pct(r.get(churn_name, "runs", "churn", "joiner_accuracy_mean")),
        "joiner_gap": signed(r.get(churn_name, "joiner_gap_points")),
        "steady_s": fixed(r.get(churn_name, "runs", "steady", "wall_seconds"), 0),
        "churn_s": fixed(r.get(churn_name, "runs", "churn", "wall_seconds"), 0),
    }
    strag = "results/stragglers.json"
    stragglers = {
        "peers": str(r.get(strag, "peers")),
        "slow": str(r.get(strag, "slow")),
        "target": pct(r.get(strag, "target")),
        "sync_s": fixed(r.get(strag, "sync", "time_to_target"), 1),
        "async_s": fixed(r.get(strag, "async", "time_to_target"), 1),
        "sync_acc": pct(r.get(strag, "sync", "final_accuracy")),
        "async_acc": pct(r.get(strag, "async", "final_accuracy")),
        "staleness": str(r.get(strag, "async", "staleness")),
        "dropped": str(r.get(strag, "async", "too_stale")),
    }
    ot = "results/opentracker.json"
    opentracker = {
        "peers": str(r.get(ot, "peers")),
        "ours": pct(r.get(ot, "results", "fedtorrent", "test_accuracy_mean")),
        "theirs": pct(r.get(ot, "results", "opentracker", "test_accuracy_mean")),
    }
    return {
        "swarm": rows,
        "swarm_rounds": str(r.get(name, "rounds")),
        "swarm_cohort": str(r.get(name, "cohort")),
        "churn": churn,
        "stragglers": stragglers,
        "opentracker": opentracker,
    }


# --- speed -------------------------------------------------------------------------------------


def speed(r: Results) -> dict[str, Any]:
    """The seed workload end to end, the engine against a plain loop, and the CNN's limit."""
    name = "benchmarks/results/sim_speed.json"
    w = r.get(name, "product")
    phases = r.get(name, "product", "phases_s")
    threads = r.get(name, "by_threads", "2")
    rows = [
        [
            "logistic regression" if row["model"] == "logreg" else "CNN (6,000 images)",
            str(row["nodes"]),
            fixed(row["engine"]["round_s"], 3),
            fixed(row["loop"]["round_s"], 3),
            fixed(row["speedup"], 1) + "×",
        ]
        for row in threads["rows"]
        if "loop" in row
    ]
    batching = threads["cnn_batching"]
    per = batching["us_per_example_by_batch"]
    return {
        "torch": fixed(w["import_torch_s"]),
        "simulate": fixed(w["simulate_s"]),
        "over": fixed(w["over_import_torch_s"]),
        "train": fixed(w["train_s"]),
        "plain": fixed(w["plain_s"], 1),
        "ratio": fixed(w["plain_over_simulate"], 1),
        "repeats": str(len(w["runs"]["simulate_s"])),
        "phases": [[key.replace("_", " "), fixed(value, 3)] for key, value in phases.items()],
        "engine": rows,
        "cnn_us": [[batch, fixed(us, 0)] for batch, us in per.items()],
        "cnn_vmap_ms": fixed(1e3 * batching["six_nodes_vmap_s"], 1),
        "cnn_separate_ms": fixed(1e3 * batching["six_nodes_separate_s"], 1),
    }


SECTIONS: dict[str, Callable[[Results], dict[str, Any]]] = {
    "repro": reproduction,
    "seeds": table3_seeds,
    "trust": trust,
    "attacks": attacks,
    "privacy": privacy,
    "bandwidth": bandwidth,
    "scale": scale,
    "speed": speed,
}


def collect(root: Path) -> dict[str, Any]:
    """Everything the Typst source reads: formatted numbers, table rows and figure paths.

    Raises:
        MissingResultError: a results file, key or figure is missing (one line naming it).
    """
    results = Results(root)
    for name in RESULT_FILES:
        results.get(name)  # every file first, so a missing one is named before any key
    numbers = {section: extract(results) for section, extract in SECTIONS.items()}
    numbers["figures"] = {key: results.figure(path) for key, path in FIGURES.items()}
    return numbers


def build(*, root: Path = REPO, output: Path | None = None) -> Path:
    """Compile ``paper/fedtorrent.typ`` under ``root`` into ``output`` (default: the committed PDF).

    Typst runs with ``root`` as its root (figures are read from there), its bundled fonts only
    and a fixed date, so the same results give the same PDF on every machine.

    Raises:
        MissingResultError: see :func:`collect`; nothing is written then.
    """
    import typst  # noqa: PLC0415 (a dev extra: collect() works without it)

    numbers = collect(root)
    target = output or root / OUTPUT
    target.parent.mkdir(parents=True, exist_ok=True)
    typst.compile(
        str(root / SOURCE),
        output=str(target),
        root=str(root),
        sys_inputs={"numbers": json.dumps(numbers)},
        ignore_system_fonts=True,
        timestamp=0,
    )
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Build the paper; a missing result is one line on stderr and exit status 2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("output", nargs="?", type=Path, help=f"default: {OUTPUT}")
    parser.add_argument("--root", type=Path, default=REPO, help="repository root with results/")
    args = parser.parse_args(argv)
    try:
        path = build(root=args.root, output=args.output)
    except MissingResultError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
