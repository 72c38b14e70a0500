"""A progress bar on stderr for Python runs (``simulate``, ``run_swarm``), drawn with rich.

It is drawn only where someone can see it: a terminal or a Jupyter notebook. Anywhere else
(output piped to a file, a test capturing stderr, a batch job) nothing is written at all, so logs
stay clean. The bar is transient: it disappears once the run ends. rich is imported on first use,
so ``import fedtorrent`` stays fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class Advance(Protocol):
    """Moves a bar: ``advance(completed, total=None, description=None)``."""

    def __call__(
        self, completed: int, *, total: int | None = None, description: str | None = None
    ) -> None:
        """Set the count done (and optionally the total and the text before the bar)."""


def _ignore(completed: int, *, total: int | None = None, description: str | None = None) -> None:
    return None


@contextmanager
def progress_bar(description: str, *, total: int | None, enabled: bool = True) -> Iterator[Advance]:
    """A context yielding ``advance(completed, total=..., description=...)`` for one bar.

    Args:
        description: the text before the bar.
        total: how many steps make the whole run (None: unknown until an ``advance`` says).
        enabled: False yields a function that does nothing (the ``progress=False`` of callers).

    The bar goes to stderr (``rich.console.Console(stderr=True)``), and only when that is an
    interactive terminal or a notebook; otherwise the yielded function does nothing. rich's
    ``TTY_COMPATIBLE=1`` and ``TTY_INTERACTIVE=1`` force the bar on, ``TTY_INTERACTIVE=0`` off.
    """
    if not enabled:
        yield _ignore
        return
    from rich.console import Console  # noqa: PLC0415 (lazy: keep import fedtorrent fast)
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TimeElapsedColumn,
    )

    console = Console(stderr=True)
    if not (console.is_interactive or console.is_jupyter):  # a pipe or a dumb terminal
        yield _ignore
        return
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)

        def advance(
            completed: int, *, total: int | None = None, description: str | None = None
        ) -> None:
            changes: dict[str, Any] = {"completed": completed}
            if total is not None:
                changes["total"] = total
            if description is not None:
                changes["description"] = description
            bar.update(task, **changes)

        yield advance
