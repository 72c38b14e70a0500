"""``docs/cli.md``, the command reference, generated from the Typer app.

Regenerate it with ``python -m fedtorrent.cli.docs`` (or ``make docs``); a test fails when the
committed page differs from what :func:`render` writes. Hidden commands stay out of the page.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
import typer.cli
import typer.main

from fedtorrent.cli import app

COMMAND = "python -m fedtorrent.cli.docs"
PAGE = Path(__file__).resolve().parents[3] / "docs" / "cli.md"
"""Where the page lives in a source checkout (``docs/cli.md`` at the repository root)."""

_NOTE = (
    f"Generated from the code by `{COMMAND}` (or `make docs`); do not edit by hand. Every "
    "command also prints this with `--help`."
)


def _drop_hidden(command: object) -> None:
    """Remove hidden subcommands from a click group, at every depth (in place)."""
    commands = getattr(command, "commands", None)
    if isinstance(commands, dict):
        kept = {name: sub for name, sub in commands.items() if not sub.hidden}
        commands.clear()
        commands.update(kept)
        for sub in kept.values():
            _drop_hidden(sub)


def render() -> str:
    """The Markdown reference of every visible ``fedtorrent`` command, options and help.

    Returns:
        The page's text, ending in one newline; the same for the same code (no terminal width,
        date or environment goes into it).
    """
    command = typer.main.get_command(app)
    _drop_hidden(command)
    ctx = typer.Context(command, info_name="fedtorrent")
    text = typer.cli.get_docs_for_click(
        obj=command, ctx=ctx, name="fedtorrent", title="The `fedtorrent` command"
    )
    title, rest = text.split("\n\n", 1)
    return f"{title}\n\n{_NOTE}\n\n{rest.strip()}\n"


def main() -> None:
    """Write :func:`render` to ``docs/cli.md`` (or to the path given as the only argument)."""
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else PAGE
    path.write_text(render(), encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
