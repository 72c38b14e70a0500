"""The ``fedtorrent`` command: thin wrappers that parse, build a config and call the library.

Each concern registers its commands from its own module; heavy imports happen inside commands so
``fedtorrent --help`` stays fast.
"""

from __future__ import annotations

import sys

import typer

from fedtorrent.errors import FedTorrentError

app = typer.Typer(
    name="fedtorrent",
    help="Fully decentralized federated learning with learned trust.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module registers its commands on ``app`` when imported.
from fedtorrent.cli import learn, ledger, net, peer, sim, swarm  # noqa: E402

_ = (learn, ledger, net, peer, sim, swarm)


def main() -> None:
    """Run the CLI; a fedtorrent error becomes one line on stderr and exit status 2."""
    try:
        app()
    except FedTorrentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
