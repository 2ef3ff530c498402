"""No import cycles inside ``tarflow``: every module's imports read with ``ast``, not by importing.

Every ``import`` / ``from ... import`` counts, at module level and inside functions alike: a lazy
import that closes a cycle is still a cycle, only one that fails later and more confusingly.
Imports under ``if TYPE_CHECKING:`` are left out: they never run.

Edges follow what Python executes:
- ``import a.b.c`` and ``from a.b.c import x`` import ``a.b.c``; ``from a.b import c`` imports the
  package ``a.b`` (its ``__init__``) and, when ``c`` is a submodule, ``a.b.c``.
- Importing ``a.b.c`` first runs the ``__init__`` of every enclosing package that is not also an
  enclosing package of the importer (those are already running or done by then).

So a package ``__init__`` may re-export its submodules (the edges point from the ``__init__`` to
them); what makes a cycle is a submodule that imports its own package ``__init__`` (``from
tarflow.model import TarFlow`` inside ``tarflow/model/``), or two packages whose modules import
each other's packages. Ring rules checked here as well: ring 1 (model, sampling, data, eval)
imports no module from ring 2 or 3, nor ``tarflow.app``; and inside ring 1, ``model`` and
``data`` import nothing of ``sampling`` or ``eval``, and ``sampling`` nothing of ``eval``
(``RING_ONE_ORDER``), every module and every import counted (lazy ones too).
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import tarflow

ROOT = Path(tarflow.__file__).parent
RING_ONE = ("tarflow.model", "tarflow.sampling", "tarflow.data", "tarflow.eval")
OUTER = ("tarflow.lit", "tarflow.cli", "tarflow.app")
# Inside ring 1: package -> the ring-1 packages its modules must not import (docs/architecture.md).
RING_ONE_ORDER = {
    "tarflow.model": ("tarflow.sampling", "tarflow.eval"),
    "tarflow.data": ("tarflow.sampling", "tarflow.eval"),
    "tarflow.sampling": ("tarflow.eval",),
}


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("tarflow", *path.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom below ``tree`` except those in ``if TYPE_CHECKING:`` bodies."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            children = node.orelse  # the else branch does run
        else:
            children = [node]
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node
                continue
        for child in children:
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            else:
                yield from _import_nodes(child)


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom,
             known: dict[str, Path]) -> set[str]:
    """The ``tarflow`` modules one import statement runs (before the enclosing-package rule)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    base = node.module or ""
    if node.level:  # relative: resolve against the importer's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    out = {base}
    out |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the ``tarflow`` modules its imports run (see the module docstring)."""
    known = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        is_package = path.name == "__init__.py"
        own_packages = {".".join(module.split(".")[:k]) for k in range(1, module.count(".") + 1)}
        if is_package:
            own_packages.add(module)
        edges = set()
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            for target in _targets(module, is_package, node, known):
                parts = target.split(".")
                # The target itself, and every enclosing package of it that the importer is not
                # already inside (those run first).
                enclosing = {".".join(parts[:k]) for k in range(1, len(parts))} - own_packages
                edges |= {t for t in {target, *enclosing} if t in known and t != module}
        graph[module] = edges
    return graph


def test_the_graph_sees_package_reexports_and_lazy_imports() -> None:
    """The walker itself: known edges of today's tree are found, so a cycle could be too."""
    graph = import_graph()
    assert "tarflow.model.tarflow" in graph["tarflow.model"]  # a re-export in an __init__
    assert "tarflow.model" in graph["tarflow.sampling.jacobi"]  # enclosing package of a target
    assert "tarflow.files" in graph["tarflow.model.checkpoint"]
    # Function-level imports are edges too.
    modules = _modules()
    lazy = [(m, n.module) for m, p in modules.items()
            for f in ast.walk(ast.parse(p.read_text())) if isinstance(f, ast.FunctionDef)
            for n in ast.walk(f) if isinstance(n, ast.ImportFrom) and n.module in modules]
    assert lazy and all(target in graph[m] for m, target in lazy if target != m)


def test_no_import_cycles() -> None:
    try:
        TopologicalSorter(import_graph()).prepare()
    except CycleError as err:
        cycle = err.args[1]
        raise AssertionError("import cycle: " + " -> ".join(cycle)) from None


def test_ring_one_imports_nothing_from_the_outer_rings() -> None:
    bad = sorted((m, t) for m, ts in import_graph().items() if m.startswith(RING_ONE)
                 for t in ts if t.startswith(OUTER))
    assert not bad, bad


def order_violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs that break ``RING_ONE_ORDER``."""
    return sorted((m, t) for m, targets in graph.items() for package, banned in
                  RING_ONE_ORDER.items() if _inside(m, package)
                  for t in targets if any(_inside(t, b) for b in banned))


def test_ring_one_keeps_its_order() -> None:
    """model and data import nothing of sampling or eval; sampling nothing of eval."""
    bad = order_violations(import_graph())
    assert not bad, "imports against ring 1's order (docs/architecture.md): " + ", ".join(
        f"{m} -> {t}" for m, t in bad)


def test_the_order_check_catches_each_kind_of_arrow_back_up() -> None:
    """The check itself, on a graph with one arrow of each forbidden kind (as the one that
    ``tarflow.model.speed_losses -> tarflow.sampling.ranking`` was) and the allowed ones."""
    graph = {"tarflow.model.speed_losses": {"tarflow.sampling.ranking", "tarflow.model.flow"},
             "tarflow.data.prepared": {"tarflow.eval"},
             "tarflow.sampling.choose": {"tarflow.eval.fid", "tarflow.data", "tarflow.model"},
             "tarflow.eval.fid_at_n": {"tarflow.sampling", "tarflow.model"},
             "tarflow.evaluation_like": {"tarflow.sampling"}}
    assert order_violations(graph) == [("tarflow.data.prepared", "tarflow.eval"),
                                       ("tarflow.model.speed_losses", "tarflow.sampling.ranking"),
                                       ("tarflow.sampling.choose", "tarflow.eval.fid")]
    # Lazy, in-function imports are edges of the real graph too (see the first test).
