"""Crash-safe file writes: a write either completes or leaves the previous file untouched.

The one recipe every writer in the package uses (checkpoints, run records, metrics, plan caches,
FID statistics, dataset manifests): write a temporary file in the destination's own directory
(so the same filesystem, which makes the rename atomic), flush and fsync it (so the rename can
never expose a file whose bytes are still only in the page cache), ``os.replace`` it over the
destination, and fsync the directory (so the rename itself survives a power loss).

Temporary files are named ``.<name>.<random>.tmp``: hidden, and never matching ``*.ckpt`` or
``*.json``, so a scan of the directory (Lightning's ``last*.ckpt``, a resume) cannot mistake a
half-written one for the real thing. A writer that raises (a full disk, a bug, Ctrl-C) leaves
no temporary file behind.

Standard library and torch only: every ring may import it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["atomic_dir", "atomic_torch_save", "atomic_write", "fsync_dir", "fsync_file"]


def _file_mode() -> int:
    """The mode ``open()`` would give a new file: mkstemp's 0600 would hide checkpoints, caches
    and records from the rest of a team on a shared filesystem."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename (or a new file) inside ``directory`` durable.

    Best effort: some platforms cannot open a directory and some filesystems refuse to fsync
    one; neither is a reason to fail a save that has already happened.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file written through another handle (e.g. a memory map) to disk."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: str | os.PathLike,
                 data: bytes | str | Callable[[BinaryIO], Any], *,
                 encoding: str = "utf-8") -> Path:
    """Write ``path`` atomically and durably (see the module docstring).

    Args:
        path: Destination file; its directory is created if needed.
        data: The bytes, the text (encoded with ``encoding``), or a writer called with the open
            binary handle of the temporary file (``handle.name`` is its path, so a writer may
            read back what it wrote). A writer that raises leaves ``path`` as it was.
        encoding: Encoding of ``data`` when it is text.

    Returns:
        The destination path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode(encoding)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        # Reopened by name so ``handle.name`` is the temporary path (fdopen would give the fd).
        os.close(fd)
        with open(tmp, "wb") as handle:
            if isinstance(data, (bytes, bytearray, memoryview)):
                handle.write(data)
            else:
                data(handle)
            handle.flush()
            os.fchmod(handle.fileno(), _file_mode())
            os.fsync(handle.fileno())  # the bytes must be on disk before the rename exposes them
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # the previous file was never touched
        raise
    fsync_dir(target.parent)
    return target


class _FdWriter:
    """The minimal file object ``torch.save`` needs, writing straight to a descriptor.

    ``torch.save`` streams record by record into it, so a multi-gigabyte checkpoint is never
    held twice in memory, nor copied through a Python buffer.
    """

    def __init__(self, fd: int, write: Callable[[int, memoryview], int]) -> None:
        self.fd, self._write = fd, write

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):  # os.write may write fewer bytes than asked
            done += self._write(self.fd, view[done:])
        return done

    def flush(self) -> None:
        """Nothing is buffered here; fsync happens once, before the rename."""


def atomic_torch_save(obj: Any, path: str | os.PathLike, *,
                      write: Callable[[int, memoryview], int] = os.write) -> Path:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``.

    Args:
        obj: Anything ``torch.save`` accepts.
        path: Destination file; its directory is created if needed.
        write: The lowest-level write, ``os.write(fd, data)`` unless a crash test replaces it.

    Returns:
        The destination path.
    """
    return atomic_write(path, lambda handle: torch.save(obj, _FdWriter(handle.fileno(), write)))


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a whole directory (e.g. a ``save_pretrained`` folder) and expose it at ``path`` only
    once complete: the body fills the yielded hidden sibling ``.<name>.<random>.tmp``; on success
    its files are fsynced and it replaces ``path`` (an older directory there is removed only
    after the new one is complete); on any exception ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            fsync_file(file)
        # A directory cannot be os.replace'd over a non-empty one: move the old aside first,
        # so at every moment either the old or the new complete directory is at ``path``.
        old = target.parent / f".{target.name}.old.tmp" if target.exists() else None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
