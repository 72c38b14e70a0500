"""Writing files so that a crash leaves the old version or the new one, never half of either."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """A temporary file beside ``path``; on a clean exit it is fsynced and renamed onto ``path``.

    The parent folder is created when missing. On any exception the temporary file is removed
    and ``path`` is left as it was. Raises ``OSError`` when the folder cannot be made or written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_writer`; returns the path."""
    with atomic_writer(path) as handle:
        handle.write(data)
    return Path(path)
