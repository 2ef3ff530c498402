"""``tarflow-train --help``: the config groups a user can choose from, read from the shipped
config directory (``tarflow/conf/train.yaml``'s help template calls this through the
``tarflow_train_groups`` resolver), so the list never drifts from the files."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from tarflow.conf import CONFIG_DIR

# Config groups that --help does not offer: eval's sweeps, and the schema presets build on.
_NOT_TRAIN_OPTIONS = {"hparams_search": None, "hydra": None, "model": {"base"}}


def train_groups() -> str:
    """``group: option, option`` lines of the groups ``tarflow-train`` composes (``--help``)."""
    lines = []
    for group in sorted(p for p in Path(CONFIG_DIR).iterdir() if p.is_dir()):
        skip = _NOT_TRAIN_OPTIONS.get(group.name, set())
        if skip is None or group.name.startswith("_"):
            continue
        options = sorted(f.stem for f in group.glob("*.yaml") if f.stem not in skip)
        if options:
            lines.append(f"{group.name}: {', '.join(options)}")
    return "\n".join(lines)


OmegaConf.register_new_resolver("tarflow_train_groups", train_groups, replace=True)
