"""Poisoning resistance, in the simulator and in live swarms; writes ``results/``.

    FEDTORRENT_DATA=../shared/data .venv/bin/python experiments/security.py [--only attacks]

``attacks``: MNIST, logistic regression, 6 iid nodes on a complete graph, 1 and 2 sign-flipping
attackers (and, with ``--all-attacks``, every other attack with 2), 10 of 50 nodes; rules learned,
fixed, median, trimmed mean, Krum; honest nodes' final test accuracy against the attack-free run of
the same rule; the mean weight an honest node gave each attacker. Writes ``attacks.md``,
``attacks.json`` and ``plots/trust_heatmap.png`` (learned trust, 2 sign-flippers of 6).

Accuracy against epsilon is ``experiments/privacy.py``'s (``results/privacy.md``).

``extreme`` (issue 10, finding 1): one attacker whose every shared value is ``s`` (1e3, 1e10,
3e38) or ``+-s`` (1e10, 3e38). (a) The simulator: MNIST, logistic regression, 6 iid nodes on a
complete graph, 1 attacker, every rule, clean and attacked, with the plausibility screen (the
default) and, for 1e10 and 3e38, without it. (b) A live swarm of real ``fedtorrent peer``
processes: 3 honest MNIST peers and 1 attacker, learned trust, cohort 3, clean and against each
attack (and the issue's two cases with the screen off): each honest peer's final accuracy
against the clean run's and whether it rejected the attacker. Writes ``extreme.md`` and
``extreme.json``:

    FEDTORRENT_DATA=../shared/data .venv/bin/python experiments/security.py --only extreme

Every number in the files comes from the runs; nothing is typed in.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fedtorrent.config import MIXING_RULES, DataConfig, MixingConfig, SimConfig
from fedtorrent.metrics.records import read_records
from fedtorrent.sim.run import load_for, simulate

RULES = ("learned", "fixed", "median", "trimmed_mean", "krum")
OTHER_ATTACKS = ("noise", "scale", "label_flip", "free_rider", "nan")
EXTREME = (
    ("extreme", 1e3),
    ("extreme", 1e10),
    ("extreme", 3e38),
    ("extreme_mixed", 1e10),
    ("extreme_mixed", 3e38),
)
UNSCREENED = (("extreme", 1e10), ("extreme", 3e38))
"""The issue's two cases, also run with the plausibility screen off."""


def _mixing(rule: str, nodes: int, attackers: int) -> MixingConfig:
    # Robust rules told the worst case they face: trim / tolerate as many as attack.
    worst = max(attackers, 1)
    return MixingConfig(
        rule=rule,
        trim_ratio=min(0.49, (worst + 0.01) / nodes),
        byzantine=worst,
    )


def _run(base: SimConfig, rules: tuple[str, ...], seeds: tuple[int, ...], out: Path,
         dataset: Any) -> dict[str, Any]:  # fmt: skip
    configs = [
        replace(base, mixing=_mixing(rule, base.data.num_nodes, base.attackers)).with_seed(seed)
        for rule in rules
        for seed in seeds
    ]
    started = time.perf_counter()
    _, summary = simulate(configs, out_dir=out, dataset=dataset, plots=False)
    summary["seconds"] = time.perf_counter() - started
    return summary


def _acc(row: dict[str, Any]) -> tuple[float, float]:
    security = row.get("security")
    if security is not None:
        return security["honest_accuracy_mean"], security["honest_accuracy_std"]
    return row["accuracy_mean"], row["accuracy_std_nodes"]


def attacks(out: Path, *, seeds: tuple[int, ...], rounds: int, all_attacks: bool) -> float:
    """Run the attack grid; write attacks.md / attacks.json / the heatmap; return seconds."""
    base = SimConfig(
        data=DataConfig(dataset="mnist", num_nodes=6), rounds=rounds, eval_every=rounds
    )
    dataset = load_for(base)
    scenarios: list[tuple[str, SimConfig, tuple[str, ...]]] = [
        ("6 nodes, no attack", base, RULES),
        ("6 nodes, 1 sign_flip", replace(base, attack="sign_flip", attackers=1), RULES),
        ("6 nodes, 2 sign_flip", replace(base, attack="sign_flip", attackers=2), RULES),
    ]
    if all_attacks:
        scenarios += [
            (f"6 nodes, 2 {kind}", replace(base, attack=kind, attackers=2), ("learned", "fixed"))
            for kind in OTHER_ATTACKS
        ]
    big = replace(base, data=DataConfig(dataset="mnist", num_nodes=50), rounds=max(1, rounds // 2))
    scenarios += [
        ("50 nodes, no attack", big, RULES),
        ("50 nodes, 10 sign_flip", replace(big, attack="sign_flip", attackers=10), RULES),
    ]
    results: dict[str, Any] = {}
    total = 0.0
    for name, config, rules in scenarios:
        folder = out / "runs" / "attacks" / name.replace(", ", "-").replace(" ", "_")
        print(f"[attacks] {name} ...", flush=True)
        summary = _run(config, rules, seeds, folder, dataset)
        total += summary["seconds"]
        results[name] = {"folder": str(folder), "seconds": summary["seconds"],
                         "by_mixing": summary["by_mixing"]}  # fmt: skip
    _write_attacks(out, results, seeds=seeds, rounds=rounds, seconds=total, all_attacks=all_attacks)
    heat = out / "runs" / "attacks" / "6_nodes-2_sign_flip"
    _heatmap(heat / "trust.jsonl", out / "plots" / "trust_heatmap.png", attackers=[4, 5])
    return total


def _write_attacks(out: Path, results: dict[str, Any], *, seeds: tuple[int, ...], rounds: int,
                   seconds: float, all_attacks: bool) -> None:  # fmt: skip
    (out / "attacks.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    flags = " --all-attacks" if all_attacks else ""
    lines = [
        "# Poisoning resistance (simulator)",
        "",
        "Produced by `FEDTORRENT_DATA=../shared/data .venv/bin/python experiments/security.py "
        f"--only attacks{flags}`; every number below is read from the runs.",
        "",
        f"MNIST, logistic regression, iid nodes on a complete graph, {rounds} rounds (50 nodes: "
        f"{max(1, rounds // 2)}), seeds {', '.join(map(str, seeds))}. Attackers are the last K "
        "nodes; `sign_flip` shares `ref - 4 (theta - ref)`. Every node screens what it received "
        "before any rule mixes (the plausibility screen at its default, 10; `docs/algorithm.md`), "
        "so `rejected` counts the states left out as `implausible` (or not finite). Accuracy: "
        "honest nodes' final test "
        "accuracy, mean ± std across honest nodes (averaged over seeds); Δ: against the same "
        "rule without attackers. Weight per attacker: the mean weight an honest node gave each "
        "attacker in its mix (uniform would be 1/6 or 1/50; robust rules have no weights).",
        "",
    ]
    by_nodes = {"6": "6 nodes, no attack", "50": "50 nodes, no attack"}
    for name, result in results.items():
        reference = results[by_nodes[name.split()[0]]]["by_mixing"]
        lines += [f"## {name}", "", "| rule | honest accuracy % | Δ points | weight per attacker "
                  "| rejected |", "|---|---|---|---|---|"]  # fmt: skip
        for rule, row in result["by_mixing"].items():
            mean, std = _acc(row)
            ref_mean, _ = _acc(reference[rule]) if rule in reference else (float("nan"), 0.0)
            security = row.get("security") or {}
            weight = security.get("weight_to_attackers")
            rejected = sum((security.get("rejected") or {}).values())
            lines.append(
                f"| {rule} | {100 * mean:.2f} ± {100 * std:.2f} | {100 * (mean - ref_mean):+.2f} "
                f"| {'-' if weight is None else f'{weight:.4f}'} | {rejected} |"
            )
        lines.append("")
    lines += [
        "Learned trust rows of the run with 2 sign-flippers of 6 (seed "
        f"{seeds[0]}, last round): `plots/trust_heatmap.png`.",
        "",
        f"Runtime: {seconds / 60:.1f} minutes on this machine's 2 shared CPU cores.",
        "",
    ]
    (out / "attacks.md").write_text("\n".join(lines), encoding="utf-8")


def _heatmap(trust: Path, target: Path, *, attackers: list[int]) -> None:
    from matplotlib.figure import Figure  # noqa: PLC0415 (plots only)

    records = [r for r in read_records(trust) if r.get("mixing") == "learned"]
    if not records:
        return
    seed = min(r["seed"] for r in records)
    last = max((r for r in records if r["seed"] == seed), key=lambda r: r["round"])
    weights = torch.tensor(last["weights"])
    figure = Figure(figsize=(5, 4.2))
    axes = figure.subplots()
    image = axes.imshow(weights.numpy(), cmap="viridis", vmin=0.0)
    n = weights.shape[0]
    labels = [f"{i}{' (A)' if i in attackers else ''}" for i in range(n)]
    axes.set_xticks(range(n), labels)
    axes.set_yticks(range(n), labels)
    axes.set_xlabel("trusted node j")
    axes.set_ylabel("node i")
    axes.set_title(f"learned trust W[i, j], round {last['round']}, (A) = sign_flip")
    for i in range(n):
        for j in range(n):
            value = float(weights[i, j])
            shade = "white" if value < 0.5 * float(weights.max()) else "black"
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", color=shade, fontsize=7)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=120)


def _label(kind: str | None, scale: float | None, plausibility: float) -> str:
    name = "clean" if kind is None else f"{kind} {scale:g}"
    return name if plausibility > 0 else f"{name}, screen off"


def _extreme_sim(out: Path, *, seeds: tuple[int, ...], rounds: int) -> dict[str, Any]:
    """Every rule, clean and against one extreme attacker of 6, in the simulator."""
    base = SimConfig(
        data=DataConfig(dataset="mnist", num_nodes=6), rounds=rounds, eval_every=rounds
    )
    dataset = load_for(base)
    cases = [(None, None, 10.0), *((k, s, 10.0) for k, s in EXTREME)]
    cases += [(k, s, 0.0) for k, s in UNSCREENED]
    results: dict[str, Any] = {}
    for kind, scale, plausibility in cases:
        label = _label(kind, scale, plausibility)
        print(f"[extreme] simulator, {label} ...", flush=True)
        config = base
        if kind is not None:
            config = replace(base, attack=kind, attack_scale=scale, attackers=1)
        configs = [
            replace(
                config,
                mixing=replace(_mixing(rule, 6, 1), plausibility=plausibility),
            ).with_seed(seed)
            for rule in MIXING_RULES
            for seed in seeds
        ]
        folder = out / "runs" / "extreme" / label.replace(", ", "-").replace(" ", "_")
        started = time.perf_counter()
        _, summary = simulate(configs, out_dir=folder, dataset=dataset, plots=False)
        rows = {}
        for rule, row in summary["by_mixing"].items():
            mean, std = _acc(row)
            security = row.get("security") or {}
            rows[rule] = {
                "honest_accuracy_mean": mean,
                "honest_accuracy_std": std,
                "weight_to_attackers": security.get("weight_to_attackers"),
                "rejected": row["rejected"],
            }
        results[label] = {"seconds": time.perf_counter() - started, "by_mixing": rows}
    return results


def _extreme_swarm(out: Path, *, rounds: int) -> dict[str, Any]:
    """3 honest MNIST peers and 1 attacker (learned trust), clean and against each attack."""
    from fedtorrent.cli.net import create  # noqa: PLC0415
    from fedtorrent.node.swarm import SwarmConfig, peer_folder, run_swarm  # noqa: PLC0415

    cases = [(None, None, 10.0), *((k, s, 10.0) for k, s in EXTREME)]
    cases += [(k, s, 0.0) for k, s in UNSCREENED]
    results: dict[str, Any] = {}
    for kind, scale, plausibility in cases:
        label = _label(kind, scale, plausibility)
        print(f"[extreme] swarm, {label} ...", flush=True)
        folder = out / "runs" / "extreme-swarm" / label.replace(", ", "-").replace(" ", "_")
        if folder.exists():
            import shutil  # noqa: PLC0415

            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        torrent = folder / "session.torrent"
        create(output=torrent, dataset="mnist", model="logreg", nodes=4, cohort=3,
               rounds=rounds, mixing="learned", plausibility=plausibility)  # fmt: skip
        attack = {} if kind is None else {"attackers": 1, "attack": kind, "attack_scale": scale}
        config = SwarmConfig(torrent=torrent, out=folder, peers=4, exchange_timeout=30,
                             **attack)  # type: ignore[arg-type]  # fmt: skip
        started = time.perf_counter()
        summary = run_swarm(config, timeout=60 + 30 * rounds, plots=False)
        peers = []
        for index in range(3):
            records = read_records(peer_folder(folder, index) / "metrics.jsonl")
            last = records[-1] if records else {}
            verdicts = [r.get("rejected_from", {}).get("peer-3") for r in records]
            weights = [(r.get("trust_weights") or {}).get("peer-3", 0.0) or 0.0 for r in records]
            peers.append({
                "peer": f"peer-{index}",
                "state": summary["per_peer"][index]["state"],
                "rounds": len(records),
                "test_accuracy": last.get("test_accuracy"),
                "rounds_rejected_implausible": sum(v == "implausible" for v in verdicts),
                "rounds_excluded_by_trust": sum("peer-3" in r.get("excluded", []) for r in records),
                "max_weight_on_peer_3": max(weights, default=0.0),
            })  # fmt: skip
        results[label] = {
            "seconds": time.perf_counter() - started,
            "finished": summary["finished"],
            "honest": peers,
            "attacker_state": summary["per_peer"][3]["state"],
        }
    return results


def extreme(out: Path, *, seeds: tuple[int, ...], rounds: int, swarm_rounds: int) -> float:
    """Run the extreme-value grid (simulator and live swarm); write extreme.md / .json."""
    started = time.perf_counter()
    sim = _extreme_sim(out, seeds=seeds, rounds=rounds)
    swarm = _extreme_swarm(out, rounds=swarm_rounds)
    seconds = time.perf_counter() - started
    (out / "extreme.json").write_text(
        json.dumps({"simulator": sim, "swarm": swarm}, indent=2), encoding="utf-8"
    )
    _write_extreme(out, sim, swarm, seeds=seeds, rounds=rounds, swarm_rounds=swarm_rounds,
                   seconds=seconds)  # fmt: skip
    return seconds


def _write_extreme(out: Path, sim: dict[str, Any], swarm: dict[str, Any], *,
                   seeds: tuple[int, ...], rounds: int, swarm_rounds: int,
                   seconds: float) -> None:  # fmt: skip
    clean = sim["clean"]["by_mixing"]
    labels = [label for label in sim if label != "clean"]
    lines = [
        "# Extreme finite values (simulator and live swarm)",
        "",
        "Produced by `FEDTORRENT_DATA=../shared/data .venv/bin/python experiments/security.py "
        "--only extreme`; every number below is read from the runs.",
        "",
        "One attacker shares a state whose every value is `s` (`extreme`) or `+-s` with random "
        "signs (`extreme_mixed`); 3e38 is finite in float32. Before any rule mixes, every node "
        "screens what it received (`plausibility` 10, the default; `docs/algorithm.md`); "
        '"screen off" runs set it to 0.',
        "",
        "## Simulator",
        "",
        f"MNIST, logistic regression, 6 iid nodes on a complete graph, 1 attacker (node 5), "
        f"{rounds} rounds, seeds {', '.join(map(str, seeds))}; trimmed mean trims 1 per end, "
        "Krum tolerates 1. Accuracy: the honest nodes' final test accuracy (mean over them; "
        "clean: all 6 nodes) in %; Δ against the same rule's clean run, in points; "
        "rejected: states left out of honest and attacking nodes' mixes over the run "
        "(`implausible`: the screen; `trust_excluded`: learned trust; `unmixed`: a non-finite "
        "mix that kept its own vector). With a 3e38 attacker and the screen on, learned trust's "
        "`trust_excluded` are the attacker's own row (the simulator adds an attacker's true row "
        "to the mix of shared rows as a correction, which cancels catastrophically at 3e38); "
        "they only touch the attacker's model.",
        "",
        "| attack | " + " | ".join(MIXING_RULES) + " |",
        "|---|" + "---|" * len(MIXING_RULES),
        "| clean | "
        + " | ".join(f"{100 * clean[r]['honest_accuracy_mean']:.2f}" for r in MIXING_RULES)
        + " |",
    ]
    for label in labels:
        rows = sim[label]["by_mixing"]
        cells = []
        for rule in MIXING_RULES:
            mean = rows[rule]["honest_accuracy_mean"]
            delta = mean - clean[rule]["honest_accuracy_mean"]
            cells.append(f"{100 * mean:.2f} ({100 * delta:+.2f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "What was left out of the mixes, per rule and attack:", "",
              "| attack | " + " | ".join(MIXING_RULES) + " |",
              "|---|" + "---|" * len(MIXING_RULES)]  # fmt: skip
    for label in labels:
        rows = sim[label]["by_mixing"]
        cells = [", ".join(f"{n} {k}" for k, n in sorted(rows[r]["rejected"].items())) or "-"
                 for r in MIXING_RULES]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    base = {p["peer"]: p["test_accuracy"] for p in swarm["clean"]["honest"]}
    lines += [
        "",
        "## Live swarm",
        "",
        f"Real `fedtorrent peer` processes on 127.0.0.1 with a tracker: MNIST, logistic "
        f"regression, 4 peers (iid shards), cohort 3 (everyone), learned trust, {swarm_rounds} "
        "rounds, the defaults of `fedtorrent create` otherwise; `peer-3` attacks (in the clean "
        "run it is honest). Per honest peer: final test accuracy in % (Δ against the same peer "
        "in the clean run, in points), and in how many rounds it rejected `peer-3` as "
        "implausible (or learned trust excluded it).",
        "",
        "| run | finished | "
        + " | ".join(base)
        + " | rejected (rounds, per peer) | max weight on peer-3 |",
        "|---|---|" + "---|" * len(base) + "---|---|",
    ]
    for label, run in swarm.items():
        cells = []
        for peer in run["honest"]:
            acc, ref = peer["test_accuracy"], base[peer["peer"]]
            if acc is None:
                cells.append("-")
            elif label == "clean":
                cells.append(f"{100 * acc:.2f}")
            else:
                cells.append(f"{100 * acc:.2f} ({100 * (acc - ref):+.2f})")
        verdicts = ", ".join(
            f"{p['rounds_rejected_implausible']}"
            + (f"+{p['rounds_excluded_by_trust']} excl." if p["rounds_excluded_by_trust"] else "")
            for p in run["honest"]
        )
        weight = max(p["max_weight_on_peer_3"] for p in run["honest"])
        lines.append(
            f"| {label} | {run['finished']}/4 | " + " | ".join(cells)
            + f" | {'-' if label == 'clean' else verdicts} | {weight:.3f} |"
        )  # fmt: skip
    lines += [
        "",
        "Run folders: `runs/extreme/` (simulator); the swarms' `runs/extreme-swarm/` stay local "
        "(they hold the peers' private keys).",
        "",
        f"Runtime: {seconds / 60:.1f} minutes on this machine's 2 shared CPU cores.",
        "",
    ]
    (out / "extreme.md").write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    """Parse the flags and run the chosen parts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("attacks", "extreme"), default=None)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--all-attacks", action="store_true", help="every attack, 2 of 6")
    parser.add_argument("--extreme-rounds", type=int, default=20, help="simulator, --only extreme")
    parser.add_argument("--swarm-rounds", type=int, default=5, help="live swarm, --only extreme")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = tuple(args.seeds)
    if args.only in (None, "attacks"):
        seconds = attacks(args.out, seeds=seeds, rounds=args.rounds, all_attacks=args.all_attacks)
        print((args.out / "attacks.md").read_text(encoding="utf-8"))
        print(f"attacks: {seconds:.0f} s")
    if args.only in (None, "extreme"):
        seconds = extreme(args.out, seeds=(seeds[0],), rounds=args.extreme_rounds,
                          swarm_rounds=args.swarm_rounds)  # fmt: skip
        print((args.out / "extreme.md").read_text(encoding="utf-8"))
        print(f"extreme: {seconds:.0f} s")


if __name__ == "__main__":
    main()
