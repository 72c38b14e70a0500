"""The ``fedtorrent`` command: thin wrappers that parse, build a config and call the library.

Each concern registers its commands from its own module; heavy imports happen inside commands so
``fedtorrent --help`` stays fast.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading

import typer

from fedtorrent.errors import FedTorrentError, printable

app = typer.Typer(
    name="fedtorrent",
    help="Fully decentralized federated learning with learned trust.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
__all__ = ["app", "main", "printable", "run"]


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


def run() -> None:
    """The ``fedtorrent`` executable: :func:`main`, then a quick exit after torch was loaded.

    Tearing torch's modules down at interpreter exit takes 0.4 to 0.6 s and does nothing a
    finished command needs. So when only the main thread is left, the atexit handlers run, the
    standard streams are flushed and the process ends at once with the command's status
    (``os._exit``); otherwise (threads still running, or no torch) Python exits as usual.
    In-process callers (tests, notebooks) call :func:`main`, which only raises ``SystemExit``.
    """
    try:
        main()
        code: object = 0
    except SystemExit as done:
        code = done.code
    if "torch" not in sys.modules or threading.active_count() > 1:
        sys.exit(code)  # type: ignore[arg-type]
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what sys.exit would print for a message
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code or 0)
