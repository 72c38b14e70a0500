"""Command: ``peer``, one real peer of a swarm (see ``docs/peer.md``)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedtorrent.cli import app
from fedtorrent.device import DEFAULT_DEVICE, DEVICE_HELP
from fedtorrent.node.host import LOG_FORMAT, host_peers, read_plan

if TYPE_CHECKING:
    from fedtorrent.node.peer import Peer


@app.command("peer")
def peer_command(
    torrent: Annotated[
        str,
        typer.Argument(
            help="The session torrent: a file, or the URL a tracker serves it at "
            "(http://TRACKER/torrents/<info-hash>; it and its state are fetched into --out)."
        ),
    ],
    *,
    out: Annotated[
        Path, typer.Option(help="Folder for metrics, status, checkpoint, summary and log.")
    ],
    state: Annotated[
        Path | None, typer.Option(help="Initial state file (default: beside the torrent).")
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            help="Your task, PATH.py:NAME or package.module:NAME: required for a torrent made "
            "with create --task (and refused otherwise). Its model must match the torrent's "
            "state schema; its data(node_index, num_nodes) gives this peer's examples."
        ),
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where the dataset's files are.")] = None,
    node_index: Annotated[
        int | None,
        typer.Option(
            help="Which shard of the dataset this peer holds (0-based). With --task it is "
            "passed to the task's data and may be left out with --num-nodes (then (0, 1))."
        ),
    ] = None,
    num_nodes: Annotated[
        int | None, typer.Option(help="How many shards the dataset is split into.")
    ] = None,
    examples: Annotated[
        Path | None,
        typer.Option(help="Folder with this peer's own x.npy and y.npy (instead of a shard)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0 picks a free one).")] = 0,
    advertise_ip: Annotated[
        str | None, typer.Option(help="Address other peers should dial (told to the tracker).")
    ] = None,
    peer_id: Annotated[
        str | None, typer.Option(help="Peer id (default peer-<node index>, or random).")
    ] = None,
    tracker: Annotated[
        str | None, typer.Option(help="Tracker URL (default: the torrent's announce).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the checkpoint in --out.")
    ] = False,
    join: Annotated[
        bool,
        typer.Option(
            "--join",
            help="Join a swarm already under way: without a checkpoint to resume, start from "
            "the state up to 3 listed neighbours serve now (verified and screened, then "
            "averaged) and go on from the round after theirs (writes joined.json).",
        ),
    ] = False,
    download_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds the download of a torrent URL and its state may take, all told."
        ),
    ] = 60.0,
    exchange_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a round waits for its cohort at most: the cap of the adaptive "
            "deadline (a high quantile of the lags measured in recent rounds, times a margin), "
            "and the deadline of the first rounds."
        ),
    ] = 10.0,
    adaptive_deadline: Annotated[
        bool,
        typer.Option(
            "--adaptive-deadline/--fixed-deadline",
            help="Adapt each round's deadline to the measured lags of the neighbours' states, "
            "or always wait --exchange-timeout.",
        ),
    ] = True,
    staleness: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Asynchronous mode: wait for nobody; ask each cohort member once and mix its "
            "newest state if it is at most K rounds behind this peer's round. 0 or absent: "
            "the synchronous mode (wait for the neighbours' state of the round).",
        ),
    ] = None,
    slowdown: Annotated[
        float,
        typer.Option(
            min=1.0,
            help="Experiments: simulate a device F times slower: after training, wait (F-1) "
            "times the shortest training time measured so far before publishing.",
        ),
    ] = 1.0,
    seed: Annotated[
        int | None, typer.Option(help="Seed for batch order and trust batches.")
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Override the torrent's rounds.")] = None,
    key_dir: Annotated[
        Path | None,
        typer.Option(help="Folder of this peer's Ed25519 identity (default: <out>/keys)."),
    ] = None,
    attack: Annotated[
        str | None,
        typer.Option(
            help="Experiments only: make this peer an adversary (noise, sign_flip, scale, "
            "label_flip, free_rider, nan, extreme, extreme_mixed; see docs/simulator.md)."
        ),
    ] = None,
    attack_scale: Annotated[
        float | None, typer.Option(help="The attack's scale (default per attack).")
    ] = None,
    attack_from: Annotated[
        int,
        typer.Option(
            help="Experiments: share honestly in rounds 1..R and attack from round R + 1 (not "
            "label_flip)."
        ),
    ] = 0,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = DEFAULT_DEVICE,
    central: Annotated[
        bool,
        typer.Option(
            "--central",
            help="Be a client of a central FedAvg server (fedtorrent server, listed at the "
            'tracker as "server"): each round train, then fetch and adopt its average; no '
            "other peer is dialled (see docs/central.md).",
        ),
    ] = False,
    dp_max_epsilon: Annotated[
        float | None,
        typer.Option(
            help="Your privacy budget at the session's delta: refuse to start (exit 2) a "
            "session without DP or whose first round alone spends more, and end cleanly "
            '(state done, summary stopped "privacy_budget") before any round that would take '
            "epsilon past it. Default: no cap beyond the session's noise."
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also log to stderr.")] = False,
) -> None:
    """Train with the swarm: announce, exchange parameters directly with peers, mix, record.

    SIGTERM or Ctrl-C stop the peer cleanly after the current phase (status "stopped"); exit
    status 0 when the last round is done or the peer was stopped, 2 on an error.
    """
    options = dict(locals())  # the parsed command line, before anything else is defined
    import logging  # noqa: PLC0415

    peer = build_peer(options)
    handlers: list[logging.Handler] = [logging.FileHandler(out / "peer.log", encoding="utf-8")]
    if verbose:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, handlers=handlers)

    def stop(signum: int, frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("signal %d: stopping after this phase", signum)
        peer.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        peer.start()
        outcome = peer.run()
    finally:
        peer.close()
    spent = f", epsilon {peer.private.epsilon:.3f}" if peer.private is not None else ""
    if peer.stopped == "privacy_budget":
        spent += f" (stopped: the next round would pass --dp-max-epsilon {dp_max_epsilon})"
    typer.echo(f"{peer.peer_id}: {outcome} after round {peer.round_done} of {peer.rounds}{spent}")


def build_peer(options: dict[str, Any]) -> Peer:
    """The peer ``fedtorrent peer`` runs for these parsed options (not started).

    The output folder is made, and the torrent fetched and checked, before torch is imported: a
    first mistake or a hostile torrent is refused at once and in a few megabytes.
    """
    from fedtorrent.config import ATTACKS  # noqa: PLC0415
    from fedtorrent.errors import UnknownNameError  # noqa: PLC0415
    from fedtorrent.net.torrent import check_model_size, load_torrent  # noqa: PLC0415

    options = dict(options)
    torrent, out = str(options.pop("torrent")), Path(options.pop("out"))
    download_timeout = options.pop("download_timeout")
    options.pop("verbose", None)
    attack = options["attack"]
    if attack is not None and attack not in ATTACKS:  # a flag's mistake before any file or URL
        raise UnknownNameError("attack", attack, ATTACKS)
    out.mkdir(parents=True, exist_ok=True)
    torrent_path = Path(torrent)
    if torrent.startswith(("http://", "https://")):
        from fedtorrent.net.tracker.client import download_session  # noqa: PLC0415

        torrent_path = download_session(torrent, out, timeout=download_timeout)
    session = load_torrent(torrent_path).session
    check_model_size(session)

    from fedtorrent.node.peer import Peer, PeerConfig, check_task_flag  # noqa: PLC0415

    check_task_flag(session, options["task"])  # before the flags that depend on it are checked
    state = options.pop("state")
    return Peer(PeerConfig(torrent=torrent_path, out_dir=out, state_path=state, **options))


@app.command("host", hidden=True)
def host_command(
    plan: Annotated[Path, typer.Argument(help='JSON: {"peers": [[peer arguments], ...]}.')],
) -> None:
    """Run several peers in this process, one thread each (``swarm --processes``).

    Each entry of the plan holds the arguments of one ``fedtorrent peer`` command line, parsed
    and checked exactly as that command does; each peer logs to its own ``peer.log``. SIGTERM or
    Ctrl-C stop every peer; exit status 2 when any of them failed.
    """
    parser = typer.main.get_command(app).commands["peer"]  # type: ignore[attr-defined]
    peers = []
    for arguments in read_plan(plan):
        with parser.make_context("peer", list(arguments)) as context:
            peers.append(build_peer(context.params))
    if not host_peers(peers):
        raise typer.Exit(2)
