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
POSIX) and fsyncs the directory so the rename itself is durable. Remote URLs (``s3://``, ...)
keep Lightning's code path, where the object store's upload is the commit.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

# Temporary files start with a dot and end in ".tmp", so Lightning's "last*.ckpt" / "*.ckpt"
# scans of the checkpoint directory never mistake a half-written one for a checkpoint.
_TMP_SUFFIX = ".tmp"


def _is_local(path: str | os.PathLike) -> bool:
    text = os.fspath(path)
    return "://" not in text or text.startswith("file://")


def _write(fd: int, data: bytes | memoryview) -> int:
    """One ``os.write``; a separate function so tests can make the lowest-level write fail."""
    return os.write(fd, data)


class _FdWriter:
    """The minimal file object ``torch.save`` needs, writing straight to a descriptor.

    ``torch.save`` streams record by record into it, so a multi-gigabyte checkpoint is never
    held twice in memory (Lightning's default first serialises into a ``BytesIO``).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):  # os.write may write fewer bytes than asked
            done += _write(self.fd, view[done:])
        return done

    def flush(self) -> None:
        """Nothing is buffered here; fsync happens once, before the rename."""


def _file_mode() -> int:
    """The mode ``open()`` would give a new file: mkstemp's 0600 would hide checkpoints from
    the rest of a team on a shared filesystem."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (not all platforms can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. filesystems that do not support fsync on directories
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``.

    Args:
        obj: anything ``torch.save`` accepts.
        path: destination file; its directory is created if needed.

    Returns:
        The destination path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=_TMP_SUFFIX, dir=target.parent)
    try:
        torch.save(obj, _FdWriter(fd))
        os.fchmod(fd, _file_mode())
        os.fsync(fd)  # the data must be on disk before the rename can expose it
    except BaseException:
        os.close(fd)
        os.unlink(tmp)  # the previous file was never touched; only the scratch copy goes
        raise
    os.close(fd)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    return target


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
        atomic_torch_save(checkpoint, local)


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
