"""The direction of imports inside ``fedtorrent.node``, read from the source with ``ast``.

Every import counts: at the top, inside functions (lazy) and under ``if TYPE_CHECKING``, since a
type-only import still ties two modules together. ``node.peer`` is the composition root: it
imports its parts, and no part imports it (reporting gets a ``PeerSnapshot``, data gets plain
values), so ``peer <-> data <-> report`` cannot come back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fedtorrent.node

NODE = Path(fedtorrent.node.__file__).parent
PACKAGE = "fedtorrent.node"


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports anywhere, as absolute dotted names.

    ``from a.b import c`` counts as ``a.b`` and ``a.b.c`` (``c`` may be a module); relative
    imports are resolved against ``fedtorrent.node``.
    """
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = PACKAGE.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def node_imports() -> dict[str, set[str]]:
    """Per module of ``fedtorrent.node`` (short name): the other node modules it imports."""
    modules = {p.stem for p in NODE.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in modules:
        imported = imported_modules(NODE / f"{name}.py")
        graph[name] = {m for m in modules - {name} if f"{PACKAGE}.{m}" in imported}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """An import cycle of ``graph`` as ``[a, b, ..., a]``; None when it has none."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        for other in sorted(graph[name]):
            cycle = visit(other, [*path, name])
            if cycle is not None:
                return cycle
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = visit(name, [])
        if cycle is not None:
            return cycle
    return None


def test_the_reader_sees_type_checking_and_lazy_imports() -> None:
    # report imports node.exchange only under TYPE_CHECKING, peer imports node.checkpoint both at
    # the top and lazily: a reader that missed either would pass the tests below for nothing.
    graph = node_imports()
    assert "exchange" in graph["report"]
    assert {"checkpoint", "data", "report", "exchange"} <= graph["peer"]


@pytest.mark.parametrize("module", ["report", "data"])
def test_reporting_and_data_import_nothing_from_the_peer(module: str) -> None:
    imported = imported_modules(NODE / f"{module}.py")
    peer = f"{PACKAGE}.peer"
    assert not {m for m in imported if m == peer or m.startswith(f"{peer}.")}


def test_find_cycle_finds_the_old_circle_and_passes_a_tree() -> None:
    old = {"peer": {"data", "report"}, "data": {"peer"}, "report": {"peer"}}
    assert find_cycle(old) == ["data", "peer", "data"]
    assert find_cycle({"peer": {"data", "report"}, "data": set(), "report": {"data"}}) is None


def test_no_node_module_imports_the_peer_and_there_is_no_cycle() -> None:
    graph = node_imports()
    assert not [name for name, imported in graph.items() if "peer" in imported]
    assert find_cycle(graph) is None
