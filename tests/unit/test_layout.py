"""The house's layout (docs/architecture.md): what each ring may import, and thin commands.

- Ring 1 (``model``, ``sampling``, ``data``, ``eval``): every module, not only the packages,
  imports without Lightning, Hydra, OmegaConf or W&B.
- Ring 2 (``lit``): every module needs Lightning (framework-free code belongs in ring 1).
- Ring 3: ``cli`` holds the console scripts only, at most 15% of the package's lines; what the
  commands share lives in ``app``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tarflow

PACKAGE = Path(tarflow.__file__).parent
RING_ONE = ("model", "sampling", "data", "eval")
FRAMEWORKS = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb")


def _modules(folder: Path) -> list[str]:
    """Dotted names of every module under ``folder`` (packages included)."""
    names = []
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _imports(path: Path) -> set[str]:
    """Top-level names of what a file imports, anywhere in it (lazy imports count)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_every_ring_one_module_imports_no_framework() -> None:
    modules = [m for ring in RING_ONE for m in _modules(PACKAGE / ring)]
    assert "tarflow.eval.fid_at_n" in modules and "tarflow.sampling.settings" in modules
    code = (f"import importlib, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
            f"bad = [m for m in {FRAMEWORKS!r} if m in sys.modules]\nassert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    for ring in RING_ONE:  # nor lazily, inside a function
        for path in (PACKAGE / ring).rglob("*.py"):
            used = {name.split(".")[0] for name in _imports(path)}
            assert not used & set(FRAMEWORKS), (path, used & set(FRAMEWORKS))


def test_every_lit_module_needs_lightning() -> None:
    free = []
    for path in sorted((PACKAGE / "lit").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        names = _imports(path)
        # Lightning itself, or a ring-2 class it builds on (e.g. a DataModule subclass).
        if not any(n.split(".")[0] == "lightning" or n.startswith("tarflow.lit.")
                   for n in names):
            free.append(str(path.relative_to(PACKAGE)))
    assert not free, f"framework-free modules under lit/ (move them to ring 1): {free}"


def test_commands_are_thin() -> None:
    def lines(paths) -> int:
        return sum(len(p.read_text().splitlines()) for p in paths)

    total = lines(PACKAGE.rglob("*.py"))
    cli = lines((PACKAGE / "cli").glob("*.py"))
    assert cli <= 0.15 * total, f"cli/ holds {cli} of {total} lines ({cli / total:.0%})"
