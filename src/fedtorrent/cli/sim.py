"""Commands: ``simulate`` (many virtual nodes in one process) and ``reproduce`` (the paper)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from fedtorrent.cli import app
from fedtorrent.config import (
    CLUSTERED_SPLITS,
    MIXING_RULES,
    SIM_ONLY_RULES,
    SPLITS,
    TOPOLOGIES,
    DataConfig,
    MixingConfig,
    ModelConfig,
    PrivacyConfig,
    SimConfig,
    TopologyConfig,
    TrainConfig,
)
from fedtorrent.device import DEFAULT_DEVICE, DEVICE_HELP, resolve_device
from fedtorrent.errors import ConfigError

_DEFAULT = SimConfig()
_PRIVACY = PrivacyConfig()
"""The private trust fit's defaults (``trust_clip``, ``trust_noise``)."""
_DATASET_HELP = "mnist, fashion-mnist, cifar10 or digits (scikit-learn's, offline)."
_DATA_DIR_HELP = "Folder searched first for dataset files (else $FEDTORRENT_DATA, then the cache)."
_THREADS_HELP = (
    "Torch CPU threads (default: torch's, one per core; 1 when other work shares the cores)."
)


@app.command()
def simulate(
    *,
    dataset: Annotated[str, typer.Option(help=_DATASET_HELP)] = _DEFAULT.data.dataset,
    model: Annotated[str, typer.Option(help="logreg, mlp, cnn or cnn32.")] = _DEFAULT.model.name,
    nodes: Annotated[int, typer.Option(help="How many virtual nodes.")] = _DEFAULT.data.num_nodes,
    split: Annotated[
        str,
        typer.Option(
            help=f"{', '.join(SPLITS)}. label_swap and rotated deal iid, then cluster c of "
            "--clusters relabels by its own permutation or rotates images by c*360/K degrees."
        ),
    ] = _DEFAULT.data.split,
    clusters: Annotated[
        int,
        typer.Option(
            help="Clusters K for label_swap and rotated (node i in cluster i mod K; 2 to --nodes)."
        ),
    ] = _DEFAULT.data.clusters,
    alpha: Annotated[
        float, typer.Option(help="Dirichlet concentration (noniid: labels; unbalanced: sizes).")
    ] = _DEFAULT.data.alpha,
    classes_per_node: Annotated[
        int, typer.Option(help="Classes per node for shards.")
    ] = _DEFAULT.data.classes_per_node,
    min_per_node: Annotated[
        int, typer.Option(help="Smallest node for unbalanced.")
    ] = _DEFAULT.data.min_per_node,
    val_fraction: Annotated[
        float, typer.Option(help="Validation share of each node (learned trust fits on it).")
    ] = _DEFAULT.data.val_fraction,
    topology: Annotated[
        str, typer.Option(help=f"{', '.join(TOPOLOGIES)}.")
    ] = _DEFAULT.topology.kind,
    degree: Annotated[
        int, typer.Option(help="Neighbours for regular; cohort size for random_cohort.")
    ] = _DEFAULT.topology.degree,
    edge_prob: Annotated[
        float, typer.Option(help="Edge probability for erdos_renyi.")
    ] = _DEFAULT.topology.edge_prob,
    mixing: Annotated[
        list[str] | None,
        typer.Option(
            help=f"{', '.join((*MIXING_RULES, *SIM_ONLY_RULES))}; repeat to compare rules in one "
            "folder. oracle (simulator only) mixes uniformly within the node's true cluster."
        ),
    ] = None,
    trust_lr: Annotated[
        float, typer.Option(help="Plain-SGD step on trust logits.")
    ] = _DEFAULT.mixing.trust_lr,
    trust_steps: Annotated[
        int, typer.Option(help="Trust steps per round.")
    ] = _DEFAULT.mixing.trust_steps,
    trust_batch: Annotated[
        int, typer.Option(help="Validation examples per trust step.")
    ] = _DEFAULT.mixing.trust_batch_size,
    weight_floor: Annotated[
        float,
        typer.Option(help="Lowest learned weight of a cohort member (keeps trust near uniform)."),
    ] = _DEFAULT.mixing.weight_floor,
    entropy_penalty: Annotated[
        float, typer.Option(help="Pull learned trust rows towards uniform.")
    ] = _DEFAULT.mixing.entropy_penalty,
    trust_cohorts: Annotated[
        float | None,
        typer.Option(
            help="Trust-guided cohorts (learned, random_cohort): exploration share E in [0, 1]; "
            "each node samples 4x --degree candidates and picks round(degree x (1 - E)) of them "
            "by highest trust, the rest at random. Default: plain random cohorts."
        ),
    ] = _DEFAULT.mixing.trust_cohorts,
    trust_decay: Annotated[
        float,
        typer.Option(
            help="Each round a node is not in a cohort, its trust logit there moves this share of "
            "the way back to the prior 0; 0 turns it off."
        ),
    ] = _DEFAULT.mixing.trust_decay,
    trim_ratio: Annotated[
        float, typer.Option(help="Cut per end for trimmed_mean.")
    ] = _DEFAULT.mixing.trim_ratio,
    byzantine: Annotated[
        int, typer.Option(help="Attackers Krum tolerates.")
    ] = _DEFAULT.mixing.byzantine,
    plausibility: Annotated[
        float,
        typer.Option(
            help="Plausibility screen: reject a received state farther from the node's own than "
            "this multiple of the median distance (own norm included); 0 turns it off."
        ),
    ] = _DEFAULT.mixing.plausibility,
    compression: Annotated[
        str,
        typer.Option(
            help="What nodes send each other, as on the wire: none, fp16, bf16, int8, topk:F or "
            "topk:F,int8 (public copies with error feedback; docs/wire.md)."
        ),
    ] = _DEFAULT.compression,
    rounds: Annotated[int, typer.Option(help="Communication rounds.")] = _DEFAULT.rounds,
    round_schedule: Annotated[
        str, typer.Option(help="Local lr across rounds: constant, or cosine decay towards 0.")
    ] = _DEFAULT.round_schedule,
    epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = _DEFAULT.train.epochs,
    steps: Annotated[
        int | None, typer.Option(help="Local batches per round instead of epochs.")
    ] = None,
    lr: Annotated[float, typer.Option(help="Local learning rate.")] = _DEFAULT.train.lr,
    batch_size: Annotated[int, typer.Option()] = _DEFAULT.train.batch_size,
    optimizer: Annotated[
        str, typer.Option(help="sgd or adam (state resets every round).")
    ] = _DEFAULT.train.optimizer,
    schedule: Annotated[
        str, typer.Option(help="constant or cosine (decays to 0 within each round).")
    ] = _DEFAULT.train.lr_schedule,
    momentum: Annotated[float, typer.Option()] = _DEFAULT.train.momentum,
    weight_decay: Annotated[float, typer.Option()] = _DEFAULT.train.weight_decay,
    seed: Annotated[list[int] | None, typer.Option(help="Repeat for several seeds.")] = None,
    eval_every: Annotated[
        int, typer.Option(help="Evaluate every this many rounds.")
    ] = _DEFAULT.eval_every,
    eval_examples: Annotated[
        int | None, typer.Option(help="Test examples for per-round curves (final uses all).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run folder (default runs/<dataset>-<split>-<time>).")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help=_DATA_DIR_HELP)] = None,
    threads: Annotated[int | None, typer.Option(help=_THREADS_HELP)] = None,
    plots: Annotated[bool, typer.Option(help="Draw plots into the run folder.")] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
    dp_clip: Annotated[
        float | None,
        typer.Option(
            help="DP: clip each node's update (--dp-unit node) or each example's gradient "
            "(--dp-unit example) to this L2 norm (turns DP on)."
        ),
    ] = None,
    dp_noise: Annotated[
        float | None, typer.Option(help="DP noise multiplier sigma (noise std = sigma * clip).")
    ] = None,
    dp_epsilon: Annotated[
        float | None, typer.Option(help="DP target epsilon after all rounds (derives sigma).")
    ] = None,
    dp_delta: Annotated[float, typer.Option(help="DP delta.")] = 1e-5,
    dp_unit: Annotated[
        str,
        typer.Option(
            help="What DP protects: node (noise on each shared update; a node's whole data) or "
            "example (DP-SGD: clipped per-example gradients and noise in local training, "
            "Poisson batches of --batch-size expected examples; docs/privacy.md)."
        ),
    ] = "node",
    dp_trust_clip: Annotated[
        float,
        typer.Option(
            help="With --dp-unit example and --mixing learned: the private trust fit's L2 clip "
            "of each validation example's gradient of the trust logits (docs/privacy.md)."
        ),
    ] = _PRIVACY.trust_clip,
    dp_trust_noise: Annotated[
        float,
        typer.Option(
            help="With --dp-unit example and --mixing learned: the trust fit's noise multiplier; "
            "its releases count in epsilon (and in --dp-epsilon's derived noise)."
        ),
    ] = _PRIVACY.trust_noise,
    attack: Annotated[
        str | None,
        typer.Option(
            help="noise, sign_flip, scale, label_flip, free_rider, nan, extreme or "
            "extreme_mixed (docs)."
        ),
    ] = None,
    attackers: Annotated[int, typer.Option(help="The last K nodes attack.")] = 0,
    attack_scale: Annotated[
        float | None, typer.Option(help="The attack's scale (default per attack).")
    ] = None,
    attack_from: Annotated[
        int,
        typer.Option(
            help="The attackers behave honestly for the first R rounds and attack after (not "
            "label_flip); the summary gives rounds_to_exclusion."
        ),
    ] = _DEFAULT.attack_from,
    task: Annotated[
        str | None,
        typer.Option(
            help="Your own task instead of --dataset/--model: PATH.py:NAME or package.module:NAME "
            "naming a fedtorrent.Task (docs/tasks.md). Node i's data is task.data(i, --nodes)."
        ),
    ] = None,
    save_models: Annotated[
        bool,
        typer.Option(help="Save each node's final model to OUT/models/ (safetensors)."),
    ] = False,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = DEFAULT_DEVICE,
) -> None:
    """Simulate N nodes that train locally and mix with their cohorts; write a run folder.

    With --task, any model, data, loss and metrics: the summary shows the test loss and every
    metric the task returns as mean ± std across nodes, and how nodes trained (engine path).
    """
    rules = mixing or [_DEFAULT.mixing.rule]
    seeds = seed or [_DEFAULT.seed]
    base = SimConfig(
        data=DataConfig(
            dataset=dataset,
            data_dir=data_dir,
            num_nodes=nodes,
            split=split,
            alpha=alpha,
            classes_per_node=classes_per_node,
            min_per_node=min_per_node,
            val_fraction=val_fraction,
            clusters=clusters,
        ),
        model=ModelConfig(name=model),
        train=TrainConfig(
            epochs=epochs,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            optimizer=optimizer,
            lr_schedule=schedule,
            momentum=momentum,
            weight_decay=weight_decay,
        ),
        topology=TopologyConfig(kind=topology, degree=degree, edge_prob=edge_prob),
        rounds=rounds,
        round_schedule=round_schedule,
        eval_every=eval_every,
        eval_examples=eval_examples,
        privacy=privacy_config(
            dp_clip,
            dp_noise,
            dp_epsilon,
            dp_delta,
            dp_unit,
            trust_clip=dp_trust_clip,
            trust_noise=dp_trust_noise,
        ),
        attack=attack,
        attackers=attackers,
        attack_scale=attack_scale,
        attack_from=attack_from,
        compression=_compression(compression),
    )
    configs = [
        _with_rule(
            base.with_seed(s),
            MixingConfig(
                rule=rule,
                trust_lr=trust_lr,
                trust_steps=trust_steps,
                trust_batch_size=trust_batch,
                weight_floor=weight_floor,
                entropy_penalty=entropy_penalty,
                trim_ratio=trim_ratio,
                byzantine=byzantine,
                plausibility=plausibility,
                trust_cohorts=trust_cohorts if rule == "learned" else None,
                trust_decay=trust_decay if rule == "learned" else 0.0,
            ),
        )
        for rule in rules
        for s in seeds
    ]
    _check_threads(threads)
    resolve_device(device)  # an absent device: one line before any data is loaded
    if task is not None:
        _simulate_task(
            task,
            configs,
            out=out,
            threads=threads,
            progress=progress,
            save_models=save_models,
            device=device,
        )
        return
    folder = out or Path("runs") / f"{dataset}-{split}-{time.strftime('%Y%m%d-%H%M%S')}"

    import torch  # noqa: PLC0415

    from fedtorrent.sim.run import load_for  # noqa: PLC0415
    from fedtorrent.sim.run import simulate as run_simulation  # noqa: PLC0415

    if threads is not None:
        torch.set_num_threads(threads)
    data = load_for(base)
    started = time.perf_counter()
    _, summary = run_simulation(
        configs,
        out_dir=folder,
        dataset=data,
        plots=plots,
        save_models=save_models,
        device=device,
        progress=progress,
    )
    _print_summary(summary, folder=folder, seconds=time.perf_counter() - started, split=split)


def _check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")


def _simulate_task(
    spec: str,
    configs: list[SimConfig],
    *,
    out: Path | None,
    threads: int | None,
    progress: bool,
    save_models: bool,
    device: str,
) -> None:
    """``simulate --task``: load and check the task, run it, print mean ± std of every metric."""
    import torch  # noqa: PLC0415

    from fedtorrent.sim.run import simulate as run_simulation  # noqa: PLC0415
    from fedtorrent.task import load_task  # noqa: PLC0415

    loaded = load_task(spec)
    name = spec.rsplit(":", 1)[-1].replace(".", "-") or "task"
    folder = out or Path("runs") / f"task-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    _, summary = run_simulation(
        configs,
        out_dir=folder,
        task=loaded,
        save_models=save_models,
        device=device,
        progress=progress,
    )
    print_metrics(summary)
    seconds = time.perf_counter() - started
    print(f"done in {seconds:.1f} s; records and summary.json in {folder}")


def print_metrics(summary: dict[str, Any]) -> None:
    """One line per mixing rule: ``rule (path, split): loss 0.31 ± 0.02, r2 0.47 ± 0.01``."""
    for rule, row in summary["by_mixing"].items():
        cells = [
            f"{metric} {v['mean']:.4g} ± {v['std']:.2g}" for metric, v in row["metrics"].items()
        ]
        where = ", ".join(str(p) for p in (row.get("engine_path"), row.get("split")) if p)
        print(f"{rule} ({where}, {row['runs']} run(s)): " + ", ".join(cells))


def privacy_config(
    clip: float | None,
    noise: float | None,
    epsilon: float | None,
    delta: float,
    unit: str,
    *,
    trust_clip: float = PrivacyConfig.trust_clip,
    trust_noise: float = PrivacyConfig.trust_noise,
) -> PrivacyConfig | None:
    """The ``--dp-*`` flags as a :class:`PrivacyConfig` (None: no DP); ``simulate`` and ``create``.

    Raises:
        ConfigError: ``--dp-noise``, ``--dp-epsilon`` or ``--dp-unit example`` without
            ``--dp-clip``, or settings ``PrivacyConfig`` refuses.
    """
    if clip is None and noise is None and epsilon is None and unit == "node":
        return None
    if clip is None:
        raise ConfigError("--dp-noise, --dp-epsilon and --dp-unit example need --dp-clip")
    return PrivacyConfig(
        clip=clip, noise_multiplier=noise, target_epsilon=epsilon, delta=delta, unit=unit,
        trust_clip=trust_clip, trust_noise=trust_noise,
    )  # fmt: skip


def _with_rule(config: SimConfig, mixing: MixingConfig) -> SimConfig:
    from dataclasses import replace  # noqa: PLC0415

    return replace(config, mixing=mixing)


def _print_summary(summary: dict[str, Any], *, folder: Path, seconds: float, split: str) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    skewed = split in ("noniid", "shards", *CLUSTERED_SPLITS)
    clustered = split in CLUSTERED_SPLITS
    table = Table(title=f"final test accuracy across nodes (and seeds); folder {folder}")
    for header in ("mixing", "runs", "mean %", "std %", "std across seeds %", "macro F1"):
        table.add_column(header, justify="left" if header == "mixing" else "right")
    if skewed:
        table.add_column("own-distribution %", justify="right")
    if clustered:
        table.add_column("weight in own cluster", justify="right")
    for rule, row in summary["by_mixing"].items():
        cells = [
            rule,
            str(row["runs"]),
            f"{100 * row['accuracy_mean']:.2f}",
            f"{100 * row['accuracy_std']:.2f}",
            f"{100 * row['accuracy_std_seeds']:.2f}",
            f"{row['f1_mean']:.4f}",
        ]
        if skewed:
            cells.append(
                f"{100 * row['own_accuracy_mean']:.2f} ± {100 * row['own_accuracy_std']:.2f}"
            )
        if clustered:
            share = row.get("cluster_share_mean")
            cells.append("n/a" if share is None else f"{share:.3f}")
        table.add_row(*cells)
    console = Console()
    console.print(table)
    for rule, row in summary["by_mixing"].items():
        security = row.get("security")
        rejected = row.get("rejected") or {}
        if security is None:
            if rejected:
                console.print(f"{rule}: left out of mixes {_counts(rejected)}")
            continue
        parts = []
        if security["attackers"]:
            weight = security["weight_to_attackers"]
            parts.append(
                f"honest nodes {100 * security['honest_accuracy_mean']:.2f}% "
                f"± {100 * security['honest_accuracy_std']:.2f}, weight per attacker "
                + ("n/a" if weight is None else f"{weight:.4f}")
            )
            if security.get("attack_from"):
                rounds = security["rounds_to_exclusion"]
                parts.append(
                    f"attack from round {security['attack_from']}: excluded (weight < 0.01) "
                    + ("never" if rounds is None else f"after {rounds:g} rounds")
                )
        if rejected:
            parts.append(f"left out of mixes {_counts(rejected)}")
        if security["epsilon"] is not None:
            parts.append(f"epsilon spent {security['epsilon']:.3f}")
        console.print(f"{rule}: " + "; ".join(parts))
    console.print(f"done in {seconds:.1f} s; records, plots and summary.json in {folder}")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items()))


@app.command()
def reproduce(
    *,
    out: Annotated[Path, typer.Option(help="Where to write the tables, plots and runs.")] = Path(
        "results"
    ),
    seed: Annotated[list[int] | None, typer.Option(help="Seeds (repeat); default 0, 1, 2.")] = None,
    quick: Annotated[
        bool, typer.Option(help="A few rounds and one seed: checks the pipeline, not the paper.")
    ] = False,
    report_only: Annotated[
        bool, typer.Option(help="Only rewrite README.md and plots from OUT/reproduce.json.")
    ] = False,
    data_dir: Annotated[Path | None, typer.Option(help=_DATA_DIR_HELP)] = None,
    threads: Annotated[
        int,
        typer.Option(
            help="Torch CPU threads. 1 by default: the committed tables were made on one, and "
            "more can change the last bits of learned trust's sums."
        ),
    ] = 1,
    progress: Annotated[bool, typer.Option(help="Show progress on stderr.")] = True,
) -> None:
    """Run the seed paper's experiments (Tables 1-3, nodes and rounds sweeps) into ``out``."""
    if report_only:
        from fedtorrent.sim.reproduce import render  # noqa: PLC0415

        print(render(out).read_text(encoding="utf-8"))
        return
    _check_threads(threads)
    import torch  # noqa: PLC0415

    from fedtorrent.sim.reproduce import ReproducePlan  # noqa: PLC0415
    from fedtorrent.sim.reproduce import reproduce as run_reproduce  # noqa: PLC0415

    if threads is not None:
        torch.set_num_threads(threads)
    plan = ReproducePlan.quick() if quick else ReproducePlan()
    if seed:
        plan = plan.with_seeds(tuple(seed))
    report = run_reproduce(plan, out=out, data_dir=data_dir, log=_log if progress else None)
    print(report.read_text(encoding="utf-8"))


def _log(message: str) -> None:
    import sys  # noqa: PLC0415

    print(message, file=sys.stderr, flush=True)


def _compression(text: str) -> str:
    """``--compression`` checked and in its canonical spelling (one line when it is not valid)."""
    from fedtorrent.state.compress import Compression  # noqa: PLC0415

    return str(Compression.parse(text))
