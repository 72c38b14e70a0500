"""The ``fedtorrent`` command: thin wrappers that parse, build a config and call the library.

Each concern registers its commands from its own module; heavy imports happen inside commands so
``fedtorrent --help`` stays fast.
"""

from __future__ import annotations

import sys

import typer

from fedtorrent.errors import FedTorrentError, printable

app = typer.Typer(
    name="fedtorrent",
    help="Fully decentralized federated learning with learned trust.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
__all__ = ["app", "main", "printable"]


def _os_error(exc: OSError) -> str:
    """An OSError as a sentence: what failed and on which file."""
    if exc.filename is None:
        return str(exc)
    if isinstance(exc, FileExistsError | NotADirectoryError):  # mkdir of an output folder
        return f"cannot make the folder {exc.filename}: a file is in the way on that path"
    reason = exc.strerror or type(exc).__name__
    return f"{reason}: {exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")


# Each module registers its commands on ``app`` when imported.
from fedtorrent.cli import central, learn, ledger, net, peer, sim, swarm  # noqa: E402

_ = (central, learn, ledger, net, peer, sim, swarm)


def main() -> None:
    """Run the CLI; an error becomes one line on stderr and exit status 2.

    A fedtorrent error, or a file or folder that cannot be read or written (an ``OSError``: an
    output path under a file, a missing permission, a full disk), is printed as ``error: ...``
    on one line, escaped by :func:`printable`, never as a traceback.
    """
    try:
        app()
    except FedTorrentError as exc:
        print(f"error: {printable(exc)}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        print(f"error: {printable(_os_error(exc))}", file=sys.stderr)
        sys.exit(2)
