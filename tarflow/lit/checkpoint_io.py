"""Crash-safe checkpoint files: a save either completes or leaves the previous file untouched.

Lightning's default ``TorchCheckpointIO`` writes through an fsspec transaction. For local paths
fsspec creates the temporary file with ``tempfile.mkstemp()``, i.e. in ``$TMPDIR`` (usually
``/tmp``), and commits it with ``shutil.move``. That is a rename only when ``$TMPDIR`` and the
checkpoint directory share a filesystem. On a cluster they rarely do (local ``/tmp``, shared
run directory): ``shutil.move`` then falls back to copying into the destination, which first
truncates ``last.ckpt`` and then streams the bytes, so a process killed during the copy (time
limit, OOM killer, preemption) leaves a truncated ``last.ckpt`` and nothing to resume from.
Nothing is fsynced either, so a power loss may leave a renamed but empty file.

:class:`AtomicCheckpointIO` writes the new file next to the destination (same directory, so
the same filesystem), fsyncs it, renames it over the destination with ``os.replace`` (atomic on
POSIX) and fsyncs the directory so the rename itself is durable
(:func:`tarflow.files.atomic_torch_save`, the package's one atomic write). Remote URLs
(``s3://``, ...) keep Lightning's code path, where the object store's upload is the commit.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from tarflow.files import atomic_torch_save


def _is_local(path: str | os.PathLike) -> bool:
    text = os.fspath(path)
    return "://" not in text or text.startswith("file://")


def _write(fd: int, data: bytes | memoryview) -> int:
    """One ``os.write``; a separate function so tests can make the lowest-level write fail."""
    return os.write(fd, data)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and durable (see the module docstring).

    Loading and removal are inherited unchanged.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        """Write ``checkpoint`` to ``path``.

        Raises:
            TypeError: ``storage_options`` was given (as in Lightning's own plugin).
        """
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        local = os.fspath(path).removeprefix("file://")
        atomic_torch_save(checkpoint, local, write=_write)  # _write: read at call time


def _rerooted(state: dict[str, Any], old: str, new: str) -> dict[str, Any] | None:
    """``state`` with every recorded path under ``old`` re-rooted under ``new``; None unless each
    such file exists there (then the run was not moved whole and nothing is re-rooted)."""
    missing = []

    def move(value):
        if isinstance(value, str) and value.startswith(old + os.sep):
            moved = new + value[len(old):]
            if not os.path.exists(moved):
                missing.append(moved)
            return moved
        if isinstance(value, dict):
            return {move(k): v for k, v in value.items()}
        return value

    moved = {k: move(v) for k, v in state.items() if k != "dirpath"}
    return None if missing else {**moved, "dirpath": new}


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that follows its run directory when the run was moved or
    copied whole (another disk, a scratch directory, a colleague's folder).

    Lightning restores its bookkeeping (``last_model_path``, the top-k files and scores) only
    when the checkpoint's ``dirpath`` is the current one; resuming a moved run therefore forgot
    that ``last.ckpt`` was its own and wrote ``last-v1.ckpt`` beside it, so the README's resume
    command (``ckpt_path=.../last.ckpt``) would next resume from the stale file, and the old best
    checkpoint was never replaced. Here the recorded paths are re-rooted under the new
    ``dirpath`` when every one of those files is there, and the bookkeeping is restored as for
    an unmoved run. Otherwise (a checkpoint resumed into another run's directory) Lightning's
    own rule applies, so top-k never deletes files of the run the checkpoint came from.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old, new = state_dict.get("dirpath"), self.dirpath
        if old and new and os.path.realpath(old) != os.path.realpath(new):
            state_dict = _rerooted(state_dict, os.path.normpath(old),
                                   os.path.normpath(new)) or state_dict
        super().load_state_dict(state_dict)
