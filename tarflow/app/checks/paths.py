"""Output paths a command can write, and ``~`` in path values expanded once: start-up checks
shared by every command (``refuse_unwritable`` in :mod:`tarflow.app.checks.common` is the
argparse commands' form). Apart from ``common`` because the run-directory callback
(:mod:`tarflow.app.runs`) needs them, and ``common`` imports the one-line errors, which
import ``runs``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Config keys that name a file or folder (when present): ``~`` in their values is expanded once
# here, so the checks and every loader after them (Lightning's resume included) read one path.
PATH_KEYS = ("ckpt_path", "init_from", "autoencoder_path", "out_dir", "fid.stats_path",
             "fid.inception_weights", "data.root", "probe.root", "samples")


def expand_user_paths(cfg: DictConfig, keys: tuple[str, ...] = PATH_KEYS) -> None:
    """Rewrite the values of ``keys`` that start with ``~`` as the home-relative paths they are,
    in place, before any check reads them: the records then hold the path that was read."""
    for key in keys:
        node = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if isinstance(node, str) and node.startswith("~"):
            OmegaConf.update(cfg, key, os.path.expanduser(node), force_add=False)


def check_writable(key: str, value: Any, *, folder: bool) -> Path:
    """The path ``key`` names (``~`` expanded), refused when the command could not write it.

    A folder (``folder=True``) must be a folder, or not exist yet; a file must not be a folder.
    What does not exist yet is created under its nearest existing ancestor, which must be a
    folder this user may write (a path under a *file*, or in a read-only folder, is refused
    here instead of ending in a traceback, some after the work is done).
    """
    path = Path(str(value)).expanduser()
    if path.exists():
        if folder and not path.is_dir():
            raise ValueError(f"{key} {value} is a file, not a folder; choose a folder")
        if not folder and path.is_dir():
            raise ValueError(f"{key} {value} is a folder; give a file path")
        here = path if folder else path.parent
    else:
        here = path.parent
        while not here.exists() and here != here.parent:
            here = here.parent
        if not here.is_dir():
            raise ValueError(f"{key} {value} cannot be created: {here} is a file, "
                                     f"not a folder")
    if not os.access(here, os.W_OK | os.X_OK):
        raise ValueError(f"{key} {value} cannot be written: {here} is not writable by "
                              f"this user; choose another {key}")
    return path
