"""Commands: ``create`` a session torrent, ``show`` one, run a ``tracker``."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from fedtorrent.cli import app, printable
from fedtorrent.config import MIXING_RULES, PrivacyConfig, SimConfig, TrackerConfig
from fedtorrent.errors import ConfigError

_SIM = SimConfig()
"""``create``'s training defaults are ``simulate``'s, so both describe the same run by default."""
_TRACKER = TrackerConfig()
"""``tracker``'s defaults are the library's."""
_PRIVACY = PrivacyConfig()
"""The private trust fit's defaults (``trust_clip``, ``trust_noise``)."""


def _model_kwargs(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are read as JSON when they parse (numbers, lists), else text."""
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--model-arg takes key=value, got {pair!r}")
        try:
            kwargs[key] = json.loads(text)
        except ValueError:
            kwargs[key] = text
    return kwargs


@app.command()
def create(
    *,
    output: Annotated[Path, typer.Option("--output", "-o", help="Torrent file to write.")],
    tracker: Annotated[str, typer.Option(help="Tracker announce URL.")] = (
        "http://127.0.0.1:6969/announce"
    ),
    task: Annotated[
        str | None,
        typer.Option(
            help="Your own task, PATH.py:NAME or package.module:NAME (see docs/tasks.md): its "
            "model gives the initial state and the state schema written into the torrent; "
            "instead of --dataset and --model. Peers then run with the same --task.",
        ),
    ] = None,
    dataset: Annotated[
        str, typer.Option(help="mnist, fashion-mnist, cifar10 or digits.")
    ] = "mnist",
    model: Annotated[str, typer.Option(help="Model registry name.")] = "logreg",
    model_arg: Annotated[
        list[str] | None, typer.Option(help="Model keyword argument key=value (repeatable).")
    ] = None,
    nodes: Annotated[int, typer.Option(help="Number of peers the data is split across.")] = 6,
    split: Annotated[
        str,
        typer.Option(
            help="iid, noniid, shards, unbalanced, label_swap or rotated (clustered: see "
            "--clusters)."
        ),
    ] = "iid",
    clusters: Annotated[
        int,
        typer.Option(
            help="Clusters K for label_swap and rotated: peer i is in cluster i mod K, whose "
            "labels (or images) and test set are transformed as in simulate."
        ),
    ] = 1,
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration for skewed splits.")] = 0.5,
    classes_per_node: Annotated[int, typer.Option(help="Classes per peer for shards.")] = 2,
    val_fraction: Annotated[float, typer.Option(help="Validation share of each peer.")] = 0.2,
    rounds: Annotated[int, typer.Option(help="Learning rounds.")] = _SIM.rounds,
    round_schedule: Annotated[
        str, typer.Option(help="Local lr across rounds: constant, or cosine decay towards 0.")
    ] = _SIM.round_schedule,
    cohort: Annotated[int, typer.Option(help="Peers each peer mixes with per round.")] = 3,
    mixing: Annotated[
        str,
        typer.Option(help=f"Mixing rule: {', '.join(MIXING_RULES)} (oracle is simulator-only)."),
    ] = "learned",
    trust_lr: Annotated[float, typer.Option(help="Trust learning rate.")] = 5.0,
    trust_steps: Annotated[int, typer.Option(help="Trust SGD steps per round.")] = 10,
    compression: Annotated[
        str,
        typer.Option(
            help="What peers send each other: none, fp16, bf16, int8, topk:F or topk:F,int8 "
            "(public copies with error feedback; docs/wire.md)."
        ),
    ] = "none",
    plausibility: Annotated[
        float,
        typer.Option(
            help="Plausibility screen: a peer rejects a received state farther from its own than "
            "this multiple of the median distance (own norm included); 0 turns it off."
        ),
    ] = _SIM.mixing.plausibility,
    skip_below: Annotated[
        float,
        typer.Option(
            help="Trust-aware fetching (learned trust only): a peer stops downloading a cohort "
            "member whose weight in its mix stayed below this for --skip-after mixed rounds, "
            "and probes it again after --skip-after skipped rounds; 0 turns it off.",
            metavar="F",
        ),
    ] = _SIM.mixing.skip_below,
    skip_after: Annotated[
        int,
        typer.Option(
            help="Rounds below --skip-below before a member is skipped, and skipped rounds "
            "before it is probed.",
            metavar="R",
        ),
    ] = _SIM.mixing.skip_after,
    trust_cohorts: Annotated[
        float | None,
        typer.Option(
            help="Trust-guided cohorts (learned trust only): exploration share E in [0, 1]; a "
            "peer picks round(cohort x (1 - E)) members among the tracker's candidates by "
            "highest trust, the rest at random. Default: the neighbour book's choice.",
            metavar="E",
        ),
    ] = _SIM.mixing.trust_cohorts,
    trust_decay: Annotated[
        float,
        typer.Option(
            help="Each round a peer is not heard, its trust logit moves this share of the way "
            "back to the prior 0; 0 turns it off.",
            metavar="D",
        ),
    ] = _SIM.mixing.trust_decay,
    epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = _SIM.train.epochs,
    steps: Annotated[
        int | None, typer.Option(help="Local batches per round (overrides epochs).")
    ] = (None),
    batch_size: Annotated[int, typer.Option(help="Local batch size.")] = _SIM.train.batch_size,
    lr: Annotated[
        float, typer.Option(help="Local learning rate (of the first round with cosine).")
    ] = _SIM.train.lr,
    optimizer: Annotated[str, typer.Option(help="sgd or adam.")] = _SIM.train.optimizer,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = _SIM.train.momentum,
    dp_clip: Annotated[
        float | None,
        typer.Option(
            help="Differential privacy: clip norm of each shared update (--dp-unit node) or of "
            "each example's gradient (--dp-unit example); turns DP on."
        ),
    ] = None,
    dp_noise: Annotated[float | None, typer.Option(help="DP noise multiplier.")] = None,
    dp_epsilon: Annotated[float | None, typer.Option(help="DP target epsilon.")] = None,
    dp_delta: Annotated[float, typer.Option(help="DP delta.")] = 1e-5,
    dp_unit: Annotated[
        str,
        typer.Option(
            help="What DP protects: node (noise on each shared update) or example (DP-SGD in "
            "every peer's local training; docs/privacy.md)."
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
    seed: Annotated[
        int, typer.Option(help="Seed for the split, training and initial weights.")
    ] = 0,
    name: Annotated[str | None, typer.Option(help="Session name (default from the settings).")] = (
        None
    ),
    comment: Annotated[str | None, typer.Option(help="Free text stored in the torrent.")] = None,
    allow_key: Annotated[
        list[str] | None,
        typer.Option(
            help="Ed25519 public key (hex) of a peer a closed swarm admits (repeatable); "
            "any --allow-key or --allow-keys-file makes the swarm closed.",
            metavar="HEX",
        ),
    ] = None,
    allow_keys_file: Annotated[
        list[Path] | None,
        typer.Option(
            help="File of allowed keys, one hex key per line (# comments), e.g. a peer's "
            "keys/ed25519.pub (repeatable).",
        ),
    ] = None,
) -> None:
    """Write a session torrent and its initial state (``<output>.state``) beside it.

    Missing folders are made; both files are written atomically, the state first, so an
    interrupted run leaves no half-written file and no torrent without its state. With --task the
    task's model is built (seeded by --seed) and checked on node 0's data, and the torrent holds
    its state schema and a label, never code: every peer brings the task itself.
    """
    output.parent.mkdir(parents=True, exist_ok=True)  # a first mistake fails before any work
    from fedtorrent import config  # noqa: PLC0415 (lazy: keep --help fast)
    from fedtorrent.net.create import create_session, write_session  # noqa: PLC0415
    from fedtorrent.net.torrent import state_path_for  # noqa: PLC0415

    allow_keys = _allow_keys(allow_key or [], allow_keys_file or [])
    from fedtorrent.cli.sim import privacy_config  # noqa: PLC0415

    privacy = privacy_config(
        dp_clip, dp_noise, dp_epsilon, dp_delta, dp_unit,
        trust_clip=dp_trust_clip, trust_noise=dp_trust_noise,
    )  # fmt: skip
    built_in = config.ModelConfig(model, _model_kwargs(model_arg or []))
    session, state = create_session(
        task=task,
        model=None if task is not None else built_in,
        data=config.DataConfig(
            dataset=dataset,
            num_nodes=nodes,
            split=split,
            alpha=alpha,
            classes_per_node=classes_per_node,
            val_fraction=val_fraction,
            seed=seed,
            clusters=clusters,
        ),
        train=config.TrainConfig(
            epochs=epochs,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            optimizer=optimizer,
            momentum=momentum,
            seed=seed,
        ),
        mixing=config.MixingConfig(
            rule=mixing,
            trust_lr=trust_lr,
            trust_steps=trust_steps,
            plausibility=plausibility,
            skip_below=skip_below,
            skip_after=skip_after,
            trust_cohorts=trust_cohorts,
            trust_decay=trust_decay,
        ),
        rounds=rounds,
        round_schedule=round_schedule,
        cohort_size=cohort,
        privacy=privacy,
        compression=compression,
        allow_keys=allow_keys,
        name=name,
    )
    torrent = write_session(output, session, state, tracker=tracker, comment=comment)
    typer.echo(f"wrote {output} and {state_path_for(output)} ({len(state)} bytes)")
    typer.echo(f"info-hash {torrent.info_hash}")
    if allow_keys:
        typer.echo(f"closed swarm: {len(allow_keys)} allowed keys")


def _allow_keys(keys: list[str], files: list[Path]) -> tuple[str, ...]:
    """Every key given, checked as an Ed25519 public key, lowercased, sorted, once each."""
    from fedtorrent.net.identity import public_keys_from  # noqa: PLC0415

    found = [(key.strip().lower(), "--allow-key") for key in keys]
    for path in files:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read --allow-keys-file {path}: {exc}") from exc
        for number, line in enumerate(lines, start=1):
            text = line.split("#", 1)[0].strip().lower()
            if text:
                found.append((text, f"{path}:{number}"))
    for key, where in found:
        try:
            public_keys_from({where: key})
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return tuple(sorted({key for key, _ in found}))


def _describe(value: Any) -> Any:
    """A config as a plain dict for printing (Paths as text)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _describe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return str(value) if isinstance(value, Path) else value


@app.command()
def show(
    source: Annotated[str, typer.Argument(help="Torrent file, or an http(s) URL serving one.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
    timeout: Annotated[
        float,
        typer.Option(help="Seconds the whole download of a URL may take (connect to last byte)."),
    ] = 10.0,
) -> None:
    r"""Print a torrent's session settings and its info-hash.

    The torrent is checked as a peer would check it (its model must fit its pinned state);
    text from the torrent is printed with control characters escaped (``\x1b``, ``\u202e``).
    """
    from fedtorrent.net.torrent import check_model_size, load_torrent  # noqa: PLC0415
    from fedtorrent.net.tracker.client import download_torrent  # noqa: PLC0415

    is_url = source.startswith(("http://", "https://"))
    torrent = download_torrent(source, timeout=timeout) if is_url else load_torrent(source)
    session = torrent.session
    model_bytes = check_model_size(session)
    document = {
        "info_hash": torrent.info_hash,
        "announce": torrent.announce,
        "announce_list": [list(tier) for tier in torrent.announce_list],
        "creation_date": torrent.creation_date,
        "created_by": torrent.created_by,
        "comment": torrent.comment,
        "session": _describe(session),
    }
    document["session"]["data"].pop("data_dir")  # never part of a torrent
    if as_json:
        typer.echo(json.dumps(document, indent=2))  # ensure_ascii escapes every control character
        return
    lines = [
        f"{session.name}",
        f"  info-hash     {torrent.info_hash}",
        f"  announce      {torrent.announce}",
        *(f"  also announce {url}" for tier in torrent.announce_list for url in tier),
    ]
    if torrent.creation_date is not None:
        created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(torrent.creation_date))
        lines.append(f"  created       {created} by {torrent.created_by or '?'}")
    if torrent.comment:
        lines.append(f"  comment       {torrent.comment}")
    lines.append(
        f"  rounds        {session.rounds}, cohort of {session.cohort_size}, "
        f"{session.round_schedule} lr across rounds"
    )
    lines.append(f"  initial state {session.state_size} bytes, sha256 {session.state_sha256}")
    if model_bytes is not None:
        lines.append(f"  model size    {model_bytes} bytes of parameters")
    if session.task is not None:
        tensors = session.task.schema["tensors"]
        lines.append(
            f"  task          {session.task.label} (bring it with --task): {len(tensors)} state "
            f"keys, buffers {session.task.schema['buffers']}"
        )
    access = f"closed, {len(session.allow_keys)} allowed keys" if session.closed else "open"
    lines.append(f"  swarm         {access}")
    lines += [f"    {key}" for key in session.allow_keys]
    for label in ("model", "data", "train", "mixing", "privacy", "compression"):
        if label in ("model", "data") and session.task is not None:
            continue  # placeholders of a task session
        section = document["session"].get(label)
        if section is None:
            continue
        lines.append(f"  {label}")
        lines += [f"    {key:<17} {value}" for key, value in section.items()]
    for line in lines:
        typer.echo(printable(line))


@app.command("tracker")
def tracker_command(
    *,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 picks a free one and prints it).")] = 6969,
    db: Annotated[
        Path | None, typer.Option(help="SQLite file that keeps swarms across restarts.")
    ] = None,
    serve: Annotated[
        list[Path] | None,
        typer.Option(
            help="Torrent to serve at /torrents/<info-hash> (repeatable).", metavar="TORRENT"
        ),
    ] = None,
    allow: Annotated[
        list[str] | None, typer.Option(help="Info-hash a closed tracker admits (repeatable).")
    ] = None,
    closed: Annotated[
        bool, typer.Option(help="Admit only --allow hashes and served torrents.")
    ] = False,
    interval: Annotated[int, typer.Option(help="Seconds between announces.")] = 30,
    numwant: Annotated[int, typer.Option(help="Peers per answer unless asked otherwise.")] = 20,
    max_peers: Annotated[int, typer.Option(help="Peers per swarm at most.")] = 50_000,
    max_swarms: Annotated[int, typer.Option(help="Swarms at most.")] = 1_000,
    rate_limit: Annotated[
        float,
        typer.Option(help="Requests per second per address (0: no limit); more get 429."),
    ] = _TRACKER.rate_limit,
    rate_burst: Annotated[
        int, typer.Option(help="Requests one address may send back-to-back.")
    ] = _TRACKER.rate_burst,
    max_peers_per_address: Annotated[
        int,
        typer.Option(
            help="Peer ids one source address may list per swarm (0: no cap; sybil defence)."
        ),
    ] = _TRACKER.max_peers_per_address,
    max_connections_per_address: Annotated[
        int, typer.Option(help="Open connections per source address (0: no cap).")
    ] = _TRACKER.max_connections_per_address,
    header_timeout: Annotated[
        float, typer.Option(help="Seconds a client has to send a request's head.")
    ] = _TRACKER.header_timeout,
    idle_timeout: Annotated[
        float, typer.Option(help="Seconds an idle connection is kept open.")
    ] = _TRACKER.idle_timeout,
    signature_window: Annotated[
        float, typer.Option(help="Seconds a signed announce's ts may be off the tracker's clock.")
    ] = _TRACKER.signature_window,
    flush_interval: Annotated[
        float, typer.Option(help="Seconds between SQLite write-behind flushes.")
    ] = 0.5,
    ip_override: Annotated[
        str, typer.Option(help="Believe the ip parameter from: never, private, any.")
    ] = "private",
) -> None:
    """Run the HTTP tracker until Ctrl-C; prints the URL it listens on."""
    import logging  # noqa: PLC0415

    from fedtorrent.config import TrackerConfig  # noqa: PLC0415
    from fedtorrent.net.tracker.server import TrackerServer  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = TrackerConfig(
        host=host,
        port=port,
        db_path=db,
        interval=interval,
        numwant=numwant,
        max_peers_per_swarm=max_peers,
        max_swarms=max_swarms,
        allow=frozenset(h.lower() for h in allow or ()) if closed or allow else None,
        rate_limit=rate_limit,
        rate_burst=rate_burst,
        max_peers_per_address=max_peers_per_address,
        max_connections_per_address=max_connections_per_address,
        header_timeout=header_timeout,
        idle_timeout=idle_timeout,
        signature_window=signature_window,
        flush_interval=flush_interval,
        ip_override=ip_override,
    )
    server = TrackerServer(config, torrents=serve or [])

    def ready(url: str) -> None:
        for info_hash, served in server.served.items():
            typer.echo(f"serving {served.name} at {url}/torrents/{info_hash}")
        mode = "open" if server.registry.allow is None else "closed"
        typer.echo(f"tracker listening on {url} ({mode}); announce URL {url}/announce")
        sys.stdout.flush()  # scripts wait for this line through a pipe

    server.serve(ready=ready)
