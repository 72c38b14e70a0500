"""Compressed updates against a measured central server (issue 12); ``results/bandwidth.md``.

    FEDTORRENT_DATA=../shared/data .venv/bin/python experiments/bandwidth.py [--only sim scale]

Three parts, every number from runs:

- ``sim``: the simulator (``fedtorrent simulate``'s engine through ``ft.simulate``; its bytes are
  the wire's, ``sim/traffic.py``) on MNIST and Fashion-MNIST, 6 nodes, learned trust, cohorts of 3
  on a fixed 3-regular graph (a swarm keeps its cohort), every codec of ``CODECS``: final
  accuracy (mean ± std over seeds and nodes), bytes received per peer-round (headers and requests
  included), total peer-to-peer bytes, and the bytes until the node-mean accuracy first reaches
  ``TARGET`` x the uncompressed final accuracy. Logistic regression with ``--seeds`` seeds and
  ``--rounds`` rounds; the CNN with fewer codecs, rounds, seeds and local steps (``CNN``).
- ``scale``: peers' bytes and the central server's formula against the number of nodes
  (``PEERS``, logreg, 5 rounds; fixed cohorts, and fresh random ones for one codec) and the model
  size (logreg, mlp, cnn; 3 rounds of 5 local steps: bytes do not depend on training).
- ``swarm``: real swarms of the ``make demo`` session (``fedtorrent create --dataset mnist --model
  logreg --nodes 6 --mixing learned --cohort 3 --rounds 30``, real tracker and peer processes) for
  each codec of ``SWARM_CODECS``, and ``fedtorrent swarm --central`` (a real FedAvg server) on it:
  test accuracy, the peers' bytes (payload and headers), the tracker's and the server's, measured.

Runs go to ``--work`` (``runs/bandwidth``, not tracked); ``--only`` re-measures some parts and
keeps the others of an existing ``results/bandwidth.json`` (``--only`` alone rewrites the md and
plots from it). Full run: 18 minutes on 2 shared cores (swarm 4, sim 12, scale 3).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fedtorrent as ft
from fedtorrent.metrics.records import read_records
from fedtorrent.sim.run import load_for

ROOT = Path(__file__).resolve().parents[1]
CODECS = ("none", "fp16", "int8", "topk:0.1", "topk:0.1,int8", "topk:0.05,int8", "topk:0.01,int8")
CNN = {
    "codecs": ("none", "int8", "topk:0.1,int8", "topk:0.01,int8"),
    "rounds": 4,
    "seeds": 1,
    "steps": 30,
}
"""The CNN rows' settings: what 2 CPU cores afford (about a minute a run)."""
TARGET = 0.99
PEERS = (6, 12, 24, 48, 96)
SWARM_CODECS = ("none", "int8", "topk:0.1,int8", "topk:0.05,int8")
COHORT = 3
DEMO = [
    "--dataset",
    "mnist",
    "--model",
    "logreg",
    "--nodes",
    "6",
    "--mixing",
    "learned",
    "--cohort",
    str(COHORT),
]


def _simulate(
    folder: Path,
    *,
    dataset: str,
    model: str,
    codec: str,
    seeds: int,
    rounds: int,
    nodes: int = 6,
    topology: str = "regular",
    steps: int | None = None,
) -> dict[str, Any]:
    """One codec over ``seeds`` seeds; accuracy and bytes, with the per-round curves."""
    shutil.rmtree(folder, ignore_errors=True)
    base = ft.SimConfig(
        data=ft.DataConfig(dataset=dataset, num_nodes=nodes),
        model=ft.ModelConfig(name=model),
        mixing=ft.MixingConfig(rule="learned"),
        topology=ft.TopologyConfig(kind=topology, degree=3),
        rounds=rounds,
        eval_examples=1000,
        compression=codec,
    )
    if steps is not None:
        base = dataclasses.replace(base, train=dataclasses.replace(base.train, steps=steps))
    configs = [base.with_seed(s) for s in range(seeds)]
    tick = time.perf_counter()
    outcomes, summary = ft.simulate(
        configs, out_dir=folder, dataset=_data(dataset), plots=False, progress=False
    )
    row = summary["by_mixing"]["learned"]
    traffic = row["traffic"]
    curve = np.zeros(rounds)
    for record in read_records(folder / "rounds.jsonl"):
        curve[int(record["round"]) - 1] += record["test_accuracy"] / (nodes * seeds)
    return {
        "accuracy_mean": row["accuracy_mean"],
        "accuracy_std": row["accuracy_std"],
        "accuracy_per_seed": row["accuracy_per_seed"],
        "bytes_per_peer_round": traffic["bytes_received_per_peer_round"],
        "p2p_bytes": traffic["p2p_bytes"],
        "full_state_bytes": traffic["full_state_bytes"],
        "update_bytes": traffic["update_bytes"],
        "central_server_bytes": traffic["central_server_bytes"],
        "accuracy_per_round": curve.tolist(),
        "bytes_per_round": traffic["received_per_round"],
        "seconds": time.perf_counter() - tick,
        "engine_path": outcomes[0].engine_path,
    }


_DATA: dict[str, Any] = {}


def _data(name: str) -> Any:
    if name not in _DATA:
        _DATA[name] = load_for(ft.SimConfig(data=ft.DataConfig(dataset=name)))
    return _DATA[name]


def _reach(row: dict[str, Any], target: float) -> dict[str, Any]:
    """The first round whose node-mean accuracy reaches ``target``, and the bytes until then."""
    for index, accuracy in enumerate(row["accuracy_per_round"]):
        if accuracy >= target:
            return {"round": index + 1, "bytes": float(sum(row["bytes_per_round"][: index + 1]))}
    return {"round": None, "bytes": None}


def run_sim(work: Path, seeds: int, rounds: int) -> dict[str, Any]:
    """The codec sweep: ``{"<dataset>/<model>": {settings, target, codecs: {codec: row}}}``."""
    out: dict[str, Any] = {}
    for dataset in ("mnist", "fashion-mnist"):
        for model in ("logreg", "cnn"):
            cnn = model == "cnn"
            spec = {
                "codecs": CNN["codecs"] if cnn else CODECS,
                "rounds": CNN["rounds"] if cnn else rounds,
                "seeds": CNN["seeds"] if cnn else seeds,
                "steps": CNN["steps"] if cnn else None,
            }
            rows = {}
            for codec in spec["codecs"]:
                print(f"sim {dataset} {model} {codec}", flush=True)
                rows[codec] = _simulate(
                    work / "sim" / f"{dataset}-{model}-{codec}",
                    dataset=dataset,
                    model=model,
                    codec=codec,
                    seeds=spec["seeds"],
                    rounds=spec["rounds"],
                    steps=spec["steps"],
                )
            target = TARGET * rows["none"]["accuracy_mean"]
            for row in rows.values():
                row["to_target"] = _reach(row, target)
            out[f"{dataset}/{model}"] = {**spec, "target": target, "codecs": rows}
    return out


def run_scale(work: Path) -> dict[str, Any]:
    """Bytes against the number of nodes and against the model size (MNIST, one seed)."""
    peers = []
    for nodes in PEERS:
        for topology, codec in (
            ("regular", "none"),
            ("regular", "topk:0.1,int8"),
            ("random_cohort", "topk:0.1,int8"),
        ):
            print(f"scale {nodes} nodes {topology} {codec}", flush=True)
            row = _simulate(
                work / "scale" / f"{nodes}-{topology}-{codec}",
                dataset="mnist",
                model="logreg",
                codec=codec,
                seeds=1,
                rounds=5,
                nodes=nodes,
                topology=topology,
            )
            peers.append({"nodes": nodes, "topology": topology, "codec": codec, **row})
    models = []
    for model in ("logreg", "mlp", "cnn"):
        for codec in ("none", "int8", "topk:0.1,int8"):
            print(f"scale {model} {codec}", flush=True)
            row = _simulate(
                work / "scale" / f"{model}-{codec}",
                dataset="mnist",
                model=model,
                codec=codec,
                seeds=1,
                rounds=3,
                steps=5,
            )
            models.append({"model": model, "codec": codec, **row})
    return {"rounds_peers": 5, "rounds_models": 3, "peers": peers, "models": models}


def _cli(*args: str) -> float:
    """Run ``fedtorrent ARGS``; its wall time. A failure stops the experiment with its output."""
    tick = time.perf_counter()
    command = [sys.executable, "-c", "from fedtorrent.cli import main; main()", *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"fedtorrent {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - tick


def _swarm(folder: Path, rounds: int, codec: str, *, central: bool = False) -> dict[str, Any]:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torrent = str(folder / "session.torrent")
    _cli("create", "--output", torrent, *DEMO, "--rounds", str(rounds), "--compression", codec)
    seconds = _cli(
        "swarm",
        torrent,
        "--peers",
        "6",
        "--out",
        str(folder),
        "--no-live",
        "--no-plots",
        *(["--central"] if central else []),
    )
    summary = json.loads((folder / "summary.json").read_text())
    band = summary["bandwidth"]
    records = list(read_records(folder / "rounds.jsonl"))
    return {
        "codec": codec,
        "central": central,
        "finished": summary["finished"],
        "accuracy_mean": summary["test_accuracy_mean"],
        "accuracy_std": summary["test_accuracy_std"],
        "p2p_bytes": band["p2p_bytes_received"],
        "header_bytes": sum(r["header_bytes_received"] for r in records),
        "payload_bytes": sum(r["payload_bytes_received"] for r in records),
        "tracker_bytes": band["tracker_bytes"],
        "server_bytes": band["server_bytes"],
        "central_formula_bytes": band["central_server_bytes"],
        "peer_rounds": band["peer_rounds"],
        "seconds": seconds,
    }


def run_swarm(work: Path, rounds: int) -> dict[str, Any]:
    """Real swarms of the demo session per codec, and the central server on it."""
    runs = {}
    for codec in SWARM_CODECS:
        print(f"swarm {codec}", flush=True)
        runs[codec] = _swarm(work / "swarm" / codec.replace(",", "_"), rounds, codec)
    print("swarm --central", flush=True)
    runs["central"] = _swarm(work / "swarm" / "central", rounds, "none", central=True)
    none, server = runs["none"], runs["central"]["server_bytes"]
    done = {
        "int8_bytes_ratio": runs["int8"]["p2p_bytes"] / none["p2p_bytes"],
        "int8_accuracy_points": 100 * (runs["int8"]["accuracy_mean"] - none["accuracy_mean"]),
    }
    for codec in SWARM_CODECS[2:]:
        done[f"{codec}_bytes_vs_server"] = runs[codec]["p2p_bytes"] / server
        done[f"{codec}_accuracy_points"] = 100 * (
            runs[codec]["accuracy_mean"] - none["accuracy_mean"]
        )
    return {"rounds": rounds, "runs": runs, "done_when": done}


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def _kib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**10:.1f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def report(results: dict[str, Any]) -> str:
    """``results/bandwidth.md`` from the results."""
    lines = [
        "# Compressed updates and a measured central server",
        "",
        "Generated by `FEDTORRENT_DATA=../shared/data .venv/bin/python "
        "experiments/bandwidth.py` (see its docstring). KiB and MiB are 1024-based; bytes "
        "are what peers received, headers, signatures and requests included.",
        "",
    ]
    swarm = results.get("swarm")
    if swarm:
        runs, done = swarm["runs"], swarm["done_when"]
        lines += [
            f"## Real swarm: the `make demo` session ({swarm['rounds']} rounds, 6 peers)",
            "",
            "| run | accuracy % | p2p MiB | payload MiB | headers MiB | tracker KiB | "
            "server MiB (measured) | vs none | KiB / peer-round | simulator's | s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        predicted = results.get("sim", {}).get("mnist/logreg", {}).get("codecs", {})
        for name, row in runs.items():
            guess = None if row["central"] else predicted.get(name, {}).get("bytes_per_peer_round")
            lines.append(
                f"| {'swarm --central' if row['central'] else name} | "
                f"{100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_std']:.2f} | "
                f"{_mib(row['p2p_bytes'])} | {_mib(row['payload_bytes'])} | "
                f"{_mib(row['header_bytes'])} | {_kib(row['tracker_bytes'])} | "
                f"{_mib(row['server_bytes'])} | "
                f"{row['p2p_bytes'] / runs['none']['p2p_bytes']:.3f} | "
                f"{_kib(row['p2p_bytes'] / row['peer_rounds'])} | {_kib(guess)} | "
                f"{row['seconds']:.0f} |"
            )
        server = runs["central"]["server_bytes"]
        lines += [
            "",
            "`simulator's`: the same codec's bytes per peer-round in the MNIST logreg sweep "
            "below. With `--central` the peers' bytes are their traffic with the server; the "
            f"server's own count (sent + received) is {_mib(server)} MiB, the formula "
            f"(2 x peer-rounds x state) {_mib(runs['central']['central_formula_bytes'])} MiB.",
            "",
            "Done when (issue 12):",
            "",
            f"- int8: p2p bytes {done['int8_bytes_ratio']:.3f} x none (target <= 0.3: "
            f"{_verdict(done['int8_bytes_ratio'] <= 0.3)}), accuracy "
            f"{done['int8_accuracy_points']:+.2f} points (target within 0.3: "
            f"{_verdict(abs(done['int8_accuracy_points']) <= 0.3)}).",
        ]
        for codec in SWARM_CODECS[2:]:
            ratio, points = done[f"{codec}_bytes_vs_server"], done[f"{codec}_accuracy_points"]
            lines.append(
                f"- {codec}: p2p bytes {ratio:.3f} x the measured server's (target "
                f"below 1: {_verdict(ratio < 1)}), accuracy {points:+.2f} points (target "
                f"within 0.5: {_verdict(abs(points) <= 0.5)})."
            )
        none = runs["none"]
        state = none["central_formula_bytes"] / (2 * none["peer_rounds"])
        once = none["peer_rounds"] * COHORT * state
        lines += [
            "",
            f"The uncompressed swarm's payload ({_mib(none['payload_bytes'])} MiB) is "
            f"{none['payload_bytes'] / once:.2f} x one whole state per cohort member per round "
            f"(peer-rounds x {COHORT} x {state:.0f} B = {_mib(once)} MiB): a peer that is ahead "
            "of a neighbour is sent the neighbour's previous state whole once (then its polls "
            "say they hold it and get `not_ready`), and the new state when it comes, where a "
            "compressed reply to a poll is empty. Against that one-state-per-fetch "
            f"figure int8 moves {runs['int8']['p2p_bytes'] / once:.3f} x (headers included).",
            "",
        ]
    sim = results.get("sim")
    if sim:
        lines += [
            "## Simulator: every codec",
            "",
            "6 nodes, learned trust, each fetching 3 others on a fixed 3-regular graph; "
            f"target: {TARGET} x the uncompressed final accuracy; `to target`: bytes all "
            "nodes received until the node-mean accuracy first reached it (- : never).",
            "",
        ]
        for key, part in sim.items():
            steps = f", {part['steps']} local steps a round" if part["steps"] else ", 1 epoch"
            if part["steps"]:
                steps += "; reduced (codecs, rounds, seeds, steps) to fit 2 CPU cores"
            lines += [
                f"### {key} ({part['rounds']} rounds, {part['seeds']} seed(s){steps}; "
                f"target {100 * part['target']:.2f} %)",
                "",
                "| codec | accuracy % | KiB / peer-round | vs none | p2p MiB | to target MiB "
                "(round) | s |",
                "|---|---|---|---|---|---|---|",
            ]
            plain = part["codecs"]["none"]["bytes_per_peer_round"]
            for codec, row in part["codecs"].items():
                reach = row["to_target"]
                lines.append(
                    f"| {codec} | {100 * row['accuracy_mean']:.2f} ± "
                    f"{100 * row['accuracy_std']:.2f} | {_kib(row['bytes_per_peer_round'])} | "
                    f"{row['bytes_per_peer_round'] / plain:.3f} | {_mib(row['p2p_bytes'])} | "
                    f"{_mib(reach['bytes'])} ({reach['round'] or '-'}) | {row['seconds']:.0f} |"
                )
            lines.append("")
        lines += ["![accuracy against bytes](plots/bandwidth_accuracy.png)", ""]
    scale = results.get("scale")
    if scale:
        tracker = (swarm or {}).get("runs", {}).get("none", {})
        lines += [
            "## Scaling (simulator, MNIST, logreg, cohorts of 3)",
            "",
            f"{scale['rounds_peers']} rounds. The central server's bytes are its formula "
            "(2 x nodes x rounds x state); the tracker cannot be simulated: measured in "
            "the 6-peer swarm, "
            + (
                f"{_kib(tracker['tracker_bytes'] / tracker['peer_rounds'])} KiB per "
                "peer-round (it grows with announces, not with the model)."
                if tracker
                else "not measured in this run."
            )
            + " `random_cohort`: fresh cohorts each round, so a compressed copy is often "
            "several rounds behind (updates chain, or a whole copy past 4 rounds).",
            "",
            "| nodes | cohorts | codec | p2p MiB | KiB / peer-round | central MiB | "
            "p2p / central |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in scale["peers"]:
            lines.append(
                f"| {row['nodes']} | {row['topology']} | {row['codec']} | "
                f"{_mib(row['p2p_bytes'])} | {_kib(row['bytes_per_peer_round'])} | "
                f"{_mib(row['central_server_bytes'])} | "
                f"{row['p2p_bytes'] / row['central_server_bytes']:.3f} |"
            )
        lines += [
            "",
            f"Model size: 6 nodes, {scale['rounds_models']} rounds, fixed cohorts.",
            "",
            "| model | codec | state KiB | update KiB | KiB / peer-round | p2p / central |",
            "|---|---|---|---|---|---|",
        ]
        for row in scale["models"]:
            lines.append(
                f"| {row['model']} | {row['codec']} | {_kib(row['full_state_bytes'])} | "
                f"{_kib(row['update_bytes'] or None)} | {_kib(row['bytes_per_peer_round'])} | "
                f"{row['p2p_bytes'] / row['central_server_bytes']:.3f} |"
            )
        lines += ["", "![bytes against nodes](plots/bandwidth_scale.png)", ""]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], folder: Path) -> None:
    """``bandwidth_accuracy.png`` (final accuracy against bytes per peer-round) and
    ``bandwidth_scale.png`` (bytes against nodes)."""
    from matplotlib.figure import Figure  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    if results.get("sim"):
        figure = Figure(figsize=(11, 4))
        axes = figure.subplots(1, 2)
        for key, part in results["sim"].items():
            ax = axes[0 if key.endswith("logreg") else 1]
            rows = part["codecs"]
            ax.plot(
                [r["bytes_per_peer_round"] for r in rows.values()],
                [100 * r["accuracy_mean"] for r in rows.values()],
                "o-",
                label=key,
            )
            for codec, r in rows.items():
                ax.annotate(
                    codec, (r["bytes_per_peer_round"], 100 * r["accuracy_mean"]), fontsize=6
                )
        for ax, name in zip(axes, ("logreg", "cnn"), strict=True):
            ax.set(
                xscale="log",
                xlabel="bytes received per peer-round",
                ylabel="final accuracy %",
                title=f"{name}: accuracy against bytes shared per round",
            )
            ax.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(folder / "bandwidth_accuracy.png", dpi=120)
    if results.get("scale"):
        figure = Figure(figsize=(6, 4))
        ax = figure.subplots()
        peers = results["scale"]["peers"]
        for topology, codec in sorted({(r["topology"], r["codec"]) for r in peers}):
            rows = [r for r in peers if r["topology"] == topology and r["codec"] == codec]
            ax.plot(
                [r["nodes"] for r in rows],
                [r["p2p_bytes"] / 2**20 for r in rows],
                "o-",
                label=f"peers, {codec}, {topology}",
            )
        central = [r for r in peers if r["codec"] == "none" and r["topology"] == "regular"]
        ax.plot(
            [r["nodes"] for r in central],
            [r["central_server_bytes"] / 2**20 for r in central],
            "k--",
            label="central server (formula)",
        )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="nodes",
            ylabel="MiB over the run",
            title="bytes against the number of nodes",
        )
        ax.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(folder / "bandwidth_scale.png", dpi=120)


def main() -> None:
    """Run the parts and write ``results/bandwidth.md``, ``.json`` and the plots."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only", nargs="*", choices=("sim", "scale", "swarm"), help="none: rewrite from the JSON"
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the logreg sweep")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the logreg sweep")
    parser.add_argument("--swarm-rounds", type=int, default=30, help="the Makefile's DEMO_ROUNDS")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bandwidth")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the simulator's small batched ops run fastest on one
    path = args.results / "bandwidth.json"
    keep = args.only is not None and path.exists()
    results: dict[str, Any] = json.loads(path.read_text()) if keep else {}
    seconds = results.setdefault("seconds", {})
    parts = {
        "swarm": lambda: run_swarm(args.work, args.swarm_rounds),
        "sim": lambda: run_sim(args.work, args.seeds, args.rounds),
        "scale": lambda: run_scale(args.work),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    for name in list(parts) if args.only is None else args.only:
        tick = time.perf_counter()
        results[name] = parts[name]()
        seconds[name] = time.perf_counter() - tick
        print(f"{name}: {seconds[name]:.0f} s", flush=True)
        path.write_text(json.dumps(results, indent=2) + "\n")  # each part kept as it ends
    text = (
        report(results) + f"Run time: {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}.\n"
    )
    (args.results / "bandwidth.md").write_text(text)
    plot(results, args.results / "plots")
    print(text)


if __name__ == "__main__":
    main()
