"""The config groups each command's ``--help`` offers, read from the shipped config directory, so
the lists never drift from the files: ``tarflow-train``'s help template calls
``${tarflow_train_groups:}``, ``tarflow-sample`` / ``-eval`` call ``${tarflow_groups:sampler}``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from tarflow.app import launchers as _launchers  # noqa: F401  (the hydra/launcher resolvers)
from tarflow.conf import CONFIG_DIR

# Config groups that tarflow-train's --help does not offer: eval's sweeps, and the schema
# presets build on.
_NOT_TRAIN_OPTIONS = {"hparams_search": {"gs_jacobi_grid", "guidance_grid", "optuna_sampler"},
                      "hydra": None, "model": {"base"}}


def _options(group: Path, skip: set[str]) -> str:
    return ", ".join(sorted(f.stem for f in group.glob("*.yaml") if f.stem not in skip))


def train_groups() -> str:
    """``group: option, option`` lines of the groups ``tarflow-train`` composes."""
    lines = []
    for group in sorted(p for p in Path(CONFIG_DIR).iterdir() if p.is_dir()):
        skip = _NOT_TRAIN_OPTIONS.get(group.name, set())
        if skip is None or group.name.startswith("_"):
            continue
        options = _options(group, skip)
        if options:
            lines.append(f"{group.name}: {options}")
    return "\n".join(lines)


def group_options(*groups: str) -> str:
    """``group: option, option`` lines of the named groups (the sampling commands' help)."""
    return "\n".join(f"{g}: {_options(Path(CONFIG_DIR) / g, set())}" for g in groups)


OmegaConf.register_new_resolver("tarflow_train_groups", train_groups, replace=True)
OmegaConf.register_new_resolver("tarflow_groups", group_options, replace=True)

