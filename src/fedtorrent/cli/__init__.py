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


def printable(text: object) -> str:
    r"""``text`` made safe for a terminal: each non-printable character is shown as its escape.

    Control characters (``\x1b`` escape sequences, ``\r``, ``\n``), Unicode format characters
    (bidi overrides such as ``\u202e``) and the like cannot move the cursor, recolour or reorder
    what is shown, nor split one line into two. Every text that comes from outside (a torrent,
    a server, an error about them) is printed through it.
    """
    line = str(text)
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in line)


def _os_error(exc: OSError) -> str:
    """An OSError as a sentence: what failed and on which file."""
    if exc.filename is None:
        return str(exc)
    reason = exc.strerror or type(exc).__name__
    return f"{reason}: {exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")


# Each module registers its commands on ``app`` when imported.
from fedtorrent.cli import learn, ledger, net, peer, sim, swarm  # noqa: E402

_ = (learn, ledger, net, peer, sim, swarm)


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
