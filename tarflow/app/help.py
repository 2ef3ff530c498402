"""The config groups each command's ``--help`` offers, read from the config directories the
command composes from, so the lists never drift from the files: ``tarflow-train``'s help
template calls ``${tarflow_train_groups:}``, ``tarflow-sample`` / ``-eval`` call
``${tarflow_groups:sampler}``. Besides the shipped ``tarflow/conf``, a user's own
``--config-dir X`` is searched too, so its groups and options are listed with ours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tarflow.app import launchers as _launchers  # noqa: F401  (the hydra/launcher resolvers)
from tarflow.conf import CONFIG_DIR

# Config groups that tarflow-train's --help does not offer: eval's sweeps, and the schema
# presets build on.
_NOT_TRAIN_OPTIONS = {"hparams_search": {"gs_jacobi_grid", "guidance_grid", "optuna_sampler"},
                      "hydra": None, "model": {"base"}}


def config_dirs(root: Any = None) -> list[Path]:
    """The file-system config directories of this composition (Hydra's
    ``hydra.runtime.config_sources``: ours and any ``--config-dir``); ours alone without one."""
    try:
        sources = OmegaConf.to_container(root.hydra.runtime.config_sources, resolve=False)
    except Exception:  # not composed by Hydra (a test, a notebook)
        sources = []
    dirs = [Path(s["path"]) for s in sources if s.get("schema") == "file" and s.get("path")]
    return dirs or [Path(CONFIG_DIR)]


def _options(dirs: list[Path], group: str, skip: set[str]) -> str:
    names = {f.stem for d in dirs for f in (d / group).glob("*.yaml")}
    return ", ".join(sorted(names - skip))


def train_groups(*, _root_: Any = None) -> str:
    """``group: option, option`` lines of the groups ``tarflow-train`` composes."""
    dirs = config_dirs(_root_)
    groups = sorted({p.name for d in dirs if d.is_dir() for p in d.iterdir() if p.is_dir()})
    lines = []
    for group in groups:
        skip = _NOT_TRAIN_OPTIONS.get(group, set())
        if skip is None or group.startswith("_"):
            continue
        options = _options(dirs, group, skip)
        if options:
            lines.append(f"{group}: {options}")
    return "\n".join(lines)


def group_options(*groups: str, _root_: Any = None) -> str:
    """``group: option, option`` lines of the named groups (the sampling commands' help)."""
    dirs = config_dirs(_root_)
    return "\n".join(f"{g}: {_options(dirs, g, set())}" for g in groups)


OmegaConf.register_new_resolver("tarflow_train_groups", train_groups, replace=True)
OmegaConf.register_new_resolver("tarflow_groups", group_options, replace=True)

