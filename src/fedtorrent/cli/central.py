"""Command: ``server``, a central FedAvg server over the swarm's transport (``docs/central.md``)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from fedtorrent.cli import app


@app.command("server")
def server_command(
    torrent: Annotated[Path, typer.Argument(help="The session torrent (its .state beside it).")],
    *,
    clients: Annotated[
        int, typer.Option(help="Clients (peers started with --central) the first round waits for.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for metrics, status, summary, ledger and log.")],
    state: Annotated[
        Path | None, typer.Option(help="Initial state file (default: beside the torrent).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0 picks a free one).")] = 0,
    advertise_ip: Annotated[
        str | None, typer.Option(help="Address clients should dial (told to the tracker).")
    ] = None,
    tracker: Annotated[
        str | None, typer.Option(help="Tracker URL (default: the torrent's announce).")
    ] = None,
    exchange_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a round waits for the clients' states at most, from the start of the "
            "server's round (so it covers a client's whole round: fetch, evaluate, train)."
        ),
    ] = 60.0,
    join_timeout: Annotated[
        float, typer.Option(help="Seconds the first round waits for --clients to be listed.")
    ] = 60.0,
    rounds: Annotated[int | None, typer.Option(help="Override the torrent's rounds.")] = None,
    key_dir: Annotated[
        Path | None,
        typer.Option(help="Folder of the server's Ed25519 identity (default: <out>/keys)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also log to stderr.")] = False,
) -> None:
    """Average the clients' states each round (FedAvg, weighted by their examples); never train.

    The server announces to the tracker as peer id "server"; clients are peers started with
    --central. Every byte it moves is counted by its transport (summary.json -> traffic).
    SIGTERM or Ctrl-C stop it after the current phase; exit status 0 when done or stopped, 2 on
    an error.
    """
    import logging  # noqa: PLC0415

    from fedtorrent.net.torrent import check_model_size, load_torrent  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    check_model_size(load_torrent(torrent).session)  # refused before torch is imported

    from fedtorrent.node.central import CentralServer, ServerConfig  # noqa: PLC0415

    config = ServerConfig(
        torrent=torrent,
        out_dir=out,
        clients=clients,
        state_path=state,
        host=host,
        port=port,
        advertise_ip=advertise_ip,
        tracker=tracker,
        exchange_timeout=exchange_timeout,
        join_timeout=join_timeout,
        rounds=rounds,
        key_dir=key_dir,
    )
    handlers: list[logging.Handler] = [logging.FileHandler(out / "server.log", encoding="utf-8")]
    if verbose:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers
    )
    server = CentralServer(config)

    def stop(signum: int, frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("signal %d: stopping after this phase", signum)
        server.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.start()
        outcome = server.run()
    finally:
        server.close()
    traffic = server.summary()["traffic"]
    typer.echo(
        f"server: {outcome} after round {server.round_done} of {server.rounds}; "
        f"sent {traffic['bytes_sent']} B, received {traffic['bytes_received']} B"
    )
