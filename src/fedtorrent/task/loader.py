"""``--task PATH.py:NAME`` or ``--task package.module:NAME``: find the user's :class:`Task`.

The convention of ``uvicorn app:app`` and ``flwr run``. Loading runs the user's own code, which is
why a spec only ever comes from the user's command line, never from a torrent or a peer.

- ``PATH.py:NAME`` (anything ending in ``.py`` or holding a path separator) imports that file as
  a module of its own; its folder is put first on ``sys.path`` (as ``python PATH.py`` would), so
  it can import the files beside it.
- ``package.module:NAME`` imports the module; the current folder is on ``sys.path`` for this (as
  ``python -m`` and uvicorn do).
- ``NAME`` may be dotted (``module:tasks.small``). It names a :class:`Task`, or a function that
  takes no arguments and returns one (called once here, so it can build the task lazily).

Every failure is one :class:`~fedtorrent.errors.ConfigError` line naming the spec and what is
wrong: a file that does not exist, an import that fails (its exception chained as ``__cause__``
and logged at INFO with the traceback), a name that is missing, or an object that is not a task.

:func:`task_spec` goes the other way: the spec of a :class:`Task` object, for drivers that hand a
task to other processes (``run_swarm``), which can import code but never receive pickled objects.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from fedtorrent.errors import ConfigError
from fedtorrent.task.contract import Task, call_user, describe_exception

if TYPE_CHECKING:
    from fedtorrent.task.contract import Task

log = logging.getLogger(__name__)

_FORM = "PATH.py:NAME or package.module:NAME"
_FILE_MODULE = "_fedtorrent_task_"
"""The prefix of the module names task files are imported under."""
_IMPORTING = threading.RLock()
"""Peers hosted on threads of one process (``node.host``) load the same file at once: the second
must wait for the first's module to finish executing, not find it half-run in ``sys.modules``."""


def load_task(spec: str) -> Task:
    """The :class:`Task` that ``spec`` (``PATH.py:NAME`` or ``package.module:NAME``) names.

    Raises:
        ConfigError: a malformed spec, a missing file or module, an import that raises, a missing
            name, or an object that is neither a Task nor a no-argument function returning one.
    """
    source, name = _parse(spec)
    module = _import(spec, source)
    value: object = module
    for part in name.split("."):
        if not hasattr(value, part):
            raise ConfigError(f"--task {spec!r}: {source} has no {name!r}{_defined_tasks(module)}")
        value = getattr(value, part)
    where = f"{_absolute(source)}:{name}"  # what task_spec answers, from any folder
    if isinstance(value, Task):
        object.__setattr__(value, "_spec", where)
        return value
    if callable(value) and not isinstance(value, type):
        result = call_user(f"--task {spec!r}: {name}()", value, error=ConfigError)
        if isinstance(result, Task):
            object.__setattr__(result, "_spec", where)  # loading it again calls NAME again
            return result
        raise ConfigError(
            f"--task {spec!r}: {name}() returned {type(result).__name__}, not a fedtorrent.Task"
        )
    raise ConfigError(
        f"--task {spec!r}: {name} is {type(value).__name__}, not a fedtorrent.Task "
        "(nor a function returning one)"
    )


def task_spec(task: Task) -> str:
    """A spec that :func:`load_task` turns back into ``task`` in another process.

    In order: the spec ``task`` was loaded from (a file part made absolute); else, when ``task``
    is a module-level variable of the module it was made in, ``/abs/path/file.py:NAME`` for a
    top-level module or a script run as ``python file.py``, ``package.module:NAME`` for a module
    of a package (peers import it from the current folder or ``PYTHONPATH``, as Python would).
    Found by identity: a copy of the task is not the task.

    Raises:
        ConfigError: ``task`` is not a Task, or it has no such name (made in a notebook cell, the
            interactive prompt or inside a function), in one line saying what to do.
    """
    if not isinstance(task, Task):
        raise ConfigError(
            f"task must be a fedtorrent.Task or a spec PATH.py:NAME, got {type(task).__name__}"
        )
    loaded = getattr(task, "_spec", None)
    if isinstance(loaded, str):
        return loaded
    defined_in = getattr(task, "_defined_in", None)
    module = sys.modules.get(defined_in) if isinstance(defined_in, str) else None
    source = None if module is None else _module_source(module)
    if module is not None and source is not None:
        for name, value in vars(module).items():
            if value is task and name.isidentifier():
                return f"{source}:{name}"
    raise ConfigError(
        "peers run in their own processes and import the task: define it at module level of a .py "
        'file and pass "file.py:NAME" (this Task has no such name, e.g. it was made in a notebook '
        "cell or a function)"
    )


def _module_source(module: ModuleType) -> str | None:
    """How another process imports ``module``: a file path, a module name, or None (it cannot)."""
    name = module.__name__
    file = getattr(module, "__file__", None)
    spec = getattr(module, "__spec__", None)
    if name == "__main__" and spec is not None and spec.name not in ("__main__", None):
        name = spec.name  # python -m package.module
    elif name == "__main__" or name.startswith(_FILE_MODULE):
        return str(Path(file).resolve()) if isinstance(file, str) and file.endswith(".py") else None
    if "." in name or not (isinstance(file, str) and file.endswith(".py")):
        return name  # inside a package: its relative imports need the package
    return str(Path(file).resolve())


def _absolute(source: str) -> str:
    return str(Path(source).expanduser().resolve()) if _is_path(source) else source


def _parse(spec: str) -> tuple[str, str]:
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(f"--task {spec!r} must be {_FORM}")
    source, name = spec.rsplit(":", 1)  # rsplit: a Windows path keeps its drive colon
    if not source or not name or not all(part.isidentifier() for part in name.split(".")):
        raise ConfigError(f"--task {spec!r} must be {_FORM}, NAME a Python name")
    return source, name


def _is_path(source: str) -> bool:
    return source.endswith(".py") or "/" in source or os.sep in source


def _import(spec: str, source: str) -> ModuleType:
    if _is_path(source):
        return _import_file(spec, Path(source).expanduser())
    if not all(part.isidentifier() for part in source.split(".")):
        raise ConfigError(f"--task {spec!r}: {source!r} is neither a .py file nor a module name")
    _put_first_on_path(os.getcwd())
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (
            source == exc.name or source.startswith(exc.name + ".")
        ):  # the module itself is missing
            raise ConfigError(
                f"--task {spec!r}: no module named {exc.name!r} (not installed, nor in the "
                "current folder or on PYTHONPATH)"
            ) from exc
        raise _import_failed(spec, source, exc) from exc
    except Exception as exc:
        raise _import_failed(spec, source, exc) from exc


def _import_file(spec: str, path: Path) -> ModuleType:
    with _IMPORTING:
        return _import_file_locked(spec, path)


def _import_file_locked(spec: str, path: Path) -> ModuleType:
    if not path.is_file():
        raise ConfigError(f"--task {spec!r}: file {str(path)!r} does not exist")
    resolved = path.resolve()
    # A name of its own per file, so two task files called task.py do not collide.
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    module_name = f"{_FILE_MODULE}{resolved.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"--task {spec!r}: {str(path)!r} cannot be imported as Python")
    module = importlib.util.module_from_spec(module_spec)
    _put_first_on_path(str(resolved.parent))
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]  # nothing half-imported stays behind
        raise _import_failed(spec, str(path), exc) from exc
    return module


def _import_failed(spec: str, where: str, exc: Exception) -> ConfigError:

    log.info("--task %r: importing %s failed", spec, where, exc_info=exc)
    line = getattr(exc, "lineno", None)
    at = f" (line {line})" if isinstance(exc, SyntaxError) and line else ""
    return ConfigError(f"--task {spec!r}: importing {where} failed{at}: {describe_exception(exc)}")


def _put_first_on_path(folder: str) -> None:
    if folder not in sys.path:
        sys.path.insert(0, folder)


def _defined_tasks(module: ModuleType) -> str:

    names = sorted(k for k, v in vars(module).items() if isinstance(v, Task))
    return f" (Tasks defined there: {', '.join(names)})" if names else " (it defines no Task)"
