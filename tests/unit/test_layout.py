"""The house's layout (docs/architecture.md): what each ring may import, and thin commands.

- Ring 1 (``model``, ``sampling``, ``data``, ``eval``): every module, not only the packages,
  imports without Lightning, Hydra, OmegaConf or W&B.
- Ring 2 (``lit``): every module needs Lightning (framework-free code belongs in ring 1).
- Ring 3 (``app`` + ``cli`` + ``launch``): at most 34% of the package's lines (31.5% on 7
  December); ``cli`` holds one module per console script and nothing else (``tarflow-launch``
  lives with the wrappers it ships, in ``launch``), nothing imports ``tarflow.cli``; what the
  commands share lives in ``app``.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import tarflow

PACKAGE = Path(tarflow.__file__).parent
RING_ONE = ("model", "sampling", "data", "eval")
RING_THREE = ("app", "cli", "launch")
# Console scripts outside cli/: tarflow-launch sits with the wrapper files it ships.
SCRIPTS_OUTSIDE_CLI = {"tarflow.launch"}
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


def _lines(paths) -> int:
    return sum(len(p.read_text().splitlines()) for p in paths)


def test_ring_three_is_thin() -> None:
    total = _lines(PACKAGE.rglob("*.py"))
    ring3 = sum(_lines((PACKAGE / ring).rglob("*.py")) for ring in RING_THREE)
    assert 0 < ring3 <= 0.34 * total, (
        f"ring 3 holds {ring3} of {total} lines ({ring3 / total:.0%}); move logic to ring 1")


def test_cli_is_one_module_per_console_script() -> None:
    # [project.scripts] lines: tarflow-x = "tarflow.cli.x:main" (tomllib needs Python 3.11)
    text = (PACKAGE.parent / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    targets = set(re.findall(r'^[\w-]+\s*=\s*"([\w.]+):\w+"', section, flags=re.M))
    assert len(targets) >= 10, targets
    targets -= SCRIPTS_OUTSIDE_CLI
    modules = set(_modules(PACKAGE / "cli")) - {"tarflow.cli"}
    assert modules == targets, (
        f"cli/ modules that are no console script (shared code goes to app/): "
        f"{sorted(modules - targets)}; scripts without a module: {sorted(targets - modules)}")
    importers = [str(path.relative_to(PACKAGE)) for path in sorted(PACKAGE.rglob("*.py"))
                 if any(n == "tarflow.cli" or n.startswith("tarflow.cli.")
                        for n in _imports(path))]
    assert not importers, f"modules importing tarflow.cli (shared code goes to app/): {importers}"
