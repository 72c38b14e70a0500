"""Command: ``swarm``, a tracker and N peers on this machine with a live table."""

from __future__ import annotations

import signal
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedtorrent.cli import app
from fedtorrent.device import DEFAULT_DEVICE, DEVICE_HELP

if TYPE_CHECKING:
    from collections.abc import Iterator

    from rich.table import Table

    from fedtorrent.node.swarm import PeerView

_STATE_STYLE = {"done": "green", "failed": "red", "stopped": "yellow", "exited": "yellow"}


@app.command("swarm")
def swarm_command(
    torrent: Annotated[Path, typer.Argument(help="Session torrent (its .state file beside it).")],
    *,
    peers: Annotated[int, typer.Option(help="Peers to start (nodes 0 to N-1).")] = 6,
    processes: Annotated[
        int | None,
        typer.Option(
            help="Processes that host the peers, one thread per peer (default: one per peer up "
            "to 8 peers, else one per core and at least one per 25 peers)."
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            help="Your task (PATH.py:NAME or package.module:NAME) for a torrent made with "
            "create --task; every peer gets it (a file as an absolute path)."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run folder (default runs/<torrent name>-<time>).")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder searched first for dataset files.")
    ] = None,
    tracker: Annotated[
        str | None,
        typer.Option(help="Join this tracker (announce URL) instead of starting one here."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address the tracker and the peers bind.")] = (
        "127.0.0.1"
    ),
    tracker_port: Annotated[
        int, typer.Option(help="Port of the tracker started here (0: free).")
    ] = 0,
    port_base: Annotated[
        int, typer.Option(help="Peer i binds port-base + i (0: each picks a free port).")
    ] = 0,
    exchange_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a peer waits for its cohort each round at most (the cap of "
            "its adaptive deadline; default the peer's, 10)."
        ),
    ] = None,
    slow: Annotated[
        str | None,
        typer.Option(
            help="Stragglers: FRACTION[xF], e.g. 25%x4 (factor 4 by default): the last "
            "ceil(FRACTION x peers) peers run --slowdown F, a simulated device F times slower; "
            "the summary lists them."
        ),
    ] = None,
    staleness: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Run every peer in the asynchronous mode (peer --staleness K): mix each "
            "neighbour's newest state at most K rounds old, waiting for nobody.",
        ),
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Rounds (default: the torrent's).")] = None,
    dp_max_epsilon: Annotated[
        float | None,
        typer.Option(
            help="Every peer's privacy budget (peer --dp-max-epsilon E): a peer refuses a session "
            "whose first round spends more, and ends before a round that would pass it."
        ),
    ] = None,
    peer_arg: Annotated[
        list[str] | None, typer.Option(help="Extra argument for every peer (repeatable).")
    ] = None,
    stop_grace: Annotated[
        float, typer.Option(help="Seconds peers get to stop after SIGTERM before SIGKILL.")
    ] = 15.0,
    resume: Annotated[
        bool, typer.Option(help="Continue the peers of an earlier run in --out from checkpoints.")
    ] = False,
    live: Annotated[
        bool, typer.Option(help="Show the live table on a terminal (off: a line per change).")
    ] = True,
    plots: Annotated[bool, typer.Option(help="Draw plots into the run folder.")] = True,
    attackers: Annotated[
        int, typer.Option(help="Experiments: the last K peers attack (with --attack).")
    ] = 0,
    attack: Annotated[
        str | None,
        typer.Option(
            help="noise, sign_flip, scale, label_flip, free_rider, nan, extreme or extreme_mixed."
        ),
    ] = None,
    attack_scale: Annotated[
        float | None, typer.Option(help="The attack's scale (default per attack).")
    ] = None,
    attack_from: Annotated[
        int, typer.Option(help="The attackers share honestly in rounds 1..R, then attack.")
    ] = 0,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = DEFAULT_DEVICE,
    central: Annotated[
        bool,
        typer.Option(
            "--central",
            help="Centralized FL on the same session: also start a FedAvg server (fedtorrent "
            "server, in OUT/server) and run every peer as its client (--central); the summary "
            "puts the server's measured bytes beside the tracker's and the peers'.",
        ),
    ] = False,
    churn: Annotated[
        str | None,
        typer.Option(
            help="A churn scenario, comma-separated KIND=AMOUNT@rROUND entries: join=10%@r5 "
            "(started late with --join once the leading peer did round 5), leave=2@r8 (SIGTERM "
            "once they did round 8), kill=5%@r6 (SIGKILL at round 6, restarted with --resume a "
            "round later; kill=5%@r6+3 waits 3), tracker@r4 (the tracker restarts; +K as for "
            "kill). AMOUNT is a count or a % of --peers; the peers are drawn from the session's "
            "seed. The summary gives each peer's fate (see docs/swarm.md).",
        ),
    ] = None,
) -> None:
    """Run a tracker and N peers here; Ctrl-C stops them all; ends with a summary and plots."""
    import time  # noqa: PLC0415

    from fedtorrent.node.swarm import SwarmConfig, run_swarm  # noqa: PLC0415

    folder = out or Path("runs") / f"{torrent.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = SwarmConfig(
        torrent=torrent,
        out=folder,
        peers=peers,
        processes=processes,
        data_dir=data_dir,
        tracker=tracker,
        host=host,
        tracker_port=tracker_port,
        port_base=port_base,
        exchange_timeout=exchange_timeout,
        rounds=rounds,
        peer_args=tuple(peer_arg or ()),
        stop_grace=stop_grace,
        resume=resume,
        attackers=attackers,
        attack=attack,
        attack_scale=attack_scale,
        attack_from=attack_from,
        task=task,
        device=device,
        central=central,
        churn=churn,
        slow=slow,
        staleness=staleness,
        dp_max_epsilon=dp_max_epsilon,
    )
    stop = threading.Event()
    with _stop_on_signals(stop), _display(live=live) as show:
        summary = run_swarm(config, stop=stop, on_update=show, plots=plots, progress=False)
    _print_summary(summary, folder=folder)
    if summary["interrupted"]:
        raise typer.Exit(130)
    server = summary.get("central")
    churned = summary.get("churn")
    expected = churned["survivors"] if churned else summary["peers"]  # leavers do not finish
    if summary["finished"] < expected or (server is not None and server["state"] != "done"):
        raise typer.Exit(1)


def _stop_on_signals(stop: threading.Event) -> Any:
    """Turn SIGINT and SIGTERM into ``stop.set()`` for the block.

    A second signal does not interrupt the cleanup (that could orphan peers); it is bounded by
    ``--stop-grace`` anyway.
    """
    from contextlib import contextmanager  # noqa: PLC0415

    @contextmanager
    def handlers() -> Iterator[None]:
        def handle(signum: int, frame: object) -> None:
            word = "still stopping" if stop.is_set() else "stopping"
            print(f"{word} the swarm (peers get SIGKILL after the grace)", file=sys.stderr)
            stop.set()

        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    return handlers()


def peer_table(
    views: list[PeerView], *, title: str = "swarm", max_rows: int | None = None
) -> Table:
    """The live table: one row per peer with state, round, accuracy and bytes.

    With ``max_rows``, peers beyond it share one last row: how many, and their states counted.
    """
    from rich.table import Table  # noqa: PLC0415

    from fedtorrent.node.swarm import human_bytes  # noqa: PLC0415

    table = Table(title=title)
    for header in ("peer", "pid", "state", "round", "accuracy %", "sent", "received"):
        table.add_column(header, justify="left" if header in ("peer", "state") else "right")
    hidden: list[PeerView] = []
    if max_rows is not None and len(views) > max_rows:
        views, hidden = views[: max(1, max_rows - 1)], views[max(1, max_rows - 1) :]
    for view in views:
        progress = f"{view.round}/{view.rounds}" if view.rounds else str(view.round)
        style = _STATE_STYLE.get(view.state, "")
        table.add_row(
            view.peer_id or str(view.index),
            str(view.pid),
            f"[{style}]{view.state}[/{style}]" if style else view.state,
            progress,
            "" if view.accuracy is None else f"{100 * view.accuracy:.2f}",
            human_bytes(view.bytes_sent),
            human_bytes(view.bytes_received),
        )
    if hidden:
        states = Counter(view.state for view in hidden)
        rounds = [view.round for view in hidden]
        table.add_row(
            f"+{len(hidden)} more",
            "",
            ", ".join(f"{n} {state}" for state, n in sorted(states.items())),
            f"{min(rounds)}..{max(rounds)}",
            "", "", "",
        )  # fmt: skip
    return table


def _display(*, live: bool) -> Any:
    """A context yielding ``show(views)``: a rich Live table, or a line when something changes."""
    from contextlib import contextmanager  # noqa: PLC0415

    from rich.console import Console  # noqa: PLC0415
    from rich.live import Live  # noqa: PLC0415

    @contextmanager
    def display() -> Iterator[Any]:
        console = Console()
        if live and console.is_terminal:  # piped output gets the plain lines
            with Live(console=console, refresh_per_second=4) as screen:
                rows = max(4, console.height - 8)  # the title, header, borders and a margin
                yield lambda views: screen.update(peer_table(views, max_rows=rows))
            return
        seen: dict[int, tuple[str, int]] = {}

        def show(views: list[PeerView]) -> None:
            for view in views:
                key = (view.state, view.round)
                if seen.get(view.index) != key:
                    seen[view.index] = key
                    accuracy = "" if view.accuracy is None else f" {100 * view.accuracy:.2f}%"
                    name = "server" if view.index < 0 else f"peer {view.index}"
                    print(f"{name}: {view.state} round {view.round}{accuracy}", flush=True)

        yield show

    return display()


def _print_summary(summary: dict[str, Any], *, folder: Path) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    from fedtorrent.node.swarm import human_bytes  # noqa: PLC0415

    console = Console()
    table = Table(title=f"{summary['session']}: {summary['finished']}/{summary['peers']} finished")
    churn = summary.get("churn")
    headers = ["peer", "state", "rounds", "test accuracy %", "sent", "received"]
    for header in headers + (["fate"] if churn else []):
        table.add_column(header, justify="left" if header in ("peer", "state", "fate") else "right")
    for peer in summary["per_peer"]:
        accuracy = peer["test_accuracy"]
        table.add_row(
            str(peer["node"]),
            peer["state"],
            str(peer["rounds_completed"]),
            "" if accuracy is None else f"{100 * accuracy:.2f}",
            human_bytes(peer["bytes_sent"]),
            human_bytes(peer["bytes_received"]),
            *([peer.get("fate", "")] if churn else []),
        )
    console.print(table)
    if churn:
        survivors = churn["survivor_accuracy_mean"]
        console.print(
            f"churn {churn['spec']}: {churn['joined']} joined, {churn['left']} left, "
            f"{churn['killed']} killed ({churn['resumed']} resumed), tracker restarted "
            f"{churn['tracker_restarts']}x; {churn['survivors_finished']}/{churn['survivors']} "
            "survivors finished"
            + ("" if survivors is None else f", their mean test accuracy {100 * survivors:.2f}%")
        )
    mean, std = summary["test_accuracy_mean"], summary["test_accuracy_std"]
    if summary.get("task") is not None:  # a task's own metrics, each as mean ± std over peers
        for name, spread in (summary.get("test_metrics") or {}).items():
            console.print(
                f"test {name} {spread['mean']:.4g} ± {spread['std']:.2g} ({spread['peers']} peers)"
            )
    elif mean is not None:
        console.print(f"mean test accuracy {100 * mean:.2f}% ± {100 * std:.2f}")
    band = summary["bandwidth"]
    tracker = band["tracker_bytes"]
    central = band["central_server_bytes"]
    console.print(
        f"a central server would have moved {human_bytes(central)} by the formula "
        f"(2 x {band['peer_rounds']} peer-rounds x {human_bytes(band['state_bytes'])}); "
        + (
            "tracker bytes unknown"
            if tracker is None
            else f"the tracker moved {human_bytes(tracker)}"
            + (f" ({100 * band['tracker_vs_central']:.3f}% of that)" if central else "")
        )
        + f"; peers sent each other {human_bytes(band['p2p_bytes_sent'])}"
    )
    if band.get("server_bytes") is not None:
        console.print(
            f"the central server moved {human_bytes(band['server_bytes'])}, measured by its "
            f"transport (sent {human_bytes(band['server_bytes_sent'])}, received "
            f"{human_bytes(band['server_bytes_received'])}; "
            f"{band['server_vs_central']:.3f} x the formula); the tracker "
            + ("unknown" if tracker is None else human_bytes(tracker))
            + f"; the peers sent {human_bytes(band['p2p_bytes_sent'])}"
        )
    security = summary.get("security") or {}
    if security.get("attackers"):
        weight = security["weight_to_attackers"]
        console.print(
            f"attackers {', '.join(security['attackers'])} ({security['attack']}); honest peers: "
            f"{100 * (security['honest_accuracy_mean'] or 0):.2f}% test accuracy, mean weight on "
            f"attackers {'n/a' if weight is None else f'{weight:.4f}'}"
        )
    if security.get("rejected") or security.get("epsilon") is not None:
        epsilon = security.get("epsilon")
        budget = security.get("budget_stopped") or []
        console.print(
            f"bad messages rejected: {security.get('rejected', 0)} {security.get('rejections', {})}"
            + ("" if epsilon is None else f"; epsilon spent (most of any peer) {epsilon:.3f}")
            + (f"; {len(budget)} peers stopped at their privacy budget" if budget else "")
        )
    neighbours = summary.get("neighbours") or {}
    if neighbours.get("heard_distinct"):
        heard = neighbours["heard_distinct"].values()
        console.print(
            f"distinct neighbours heard per peer: {min(heard)} to {max(heard)}; candidate peers "
            f"skipped: {neighbours.get('skipped', 0)} {neighbours.get('candidates_skipped', {})}"
        )
    used = summary.get("resources") or {}
    if used.get("processes"):
        peak, wall = used.get("peak_memory_bytes"), summary.get("wall_seconds") or 0.0
        console.print(
            f"{summary['peers']} peers in {used['processes']} processes: {wall:.1f} s wall, "
            f"{used['cpu_seconds']:.1f} s CPU"
            + ("" if peak is None else f", peak memory {human_bytes(peak)} (PSS) = "
               f"{human_bytes(used['memory_per_peer_bytes'])} per peer")
        )  # fmt: skip
    if summary.get("slow_peers"):
        console.print(f"slow peers (simulated): {', '.join(map(str, summary['slow_peers']))}")
    if summary["interrupted"]:
        console.print("[yellow]stopped before the peers finished[/yellow]")
    console.print(f"records, plots and summary.json in {folder}")
