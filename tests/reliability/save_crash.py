"""Child process of the crash-during-save test: save a checkpoint, then die by SIGKILL half-way
through saving the next one (``python -m tests.reliability.save_crash <io> <dir>``).

``io`` is ``atomic`` (our :class:`AtomicCheckpointIO`: killed once half of the new file is
written) or ``lightning`` (Lightning's ``TorchCheckpointIO``: killed half-way through the copy that
commits the file when ``$TMPDIR`` is on another filesystem than ``dir``). SIGKILL runs no
handler and no ``finally``: what is on disk afterwards is what a real crash leaves.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from tarflow.lit import checkpoint_io

HALF = 512 * 1024  # the atomic writer is killed once this many bytes of the new file are out


def checkpoint(value: float) -> dict:
    """About 1 MB, so every write path moves it in more than one piece."""
    return {"global_step": int(value), "state_dict": {"w": torch.full((256, 1024), value)}}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm_atomic() -> None:
    real = checkpoint_io._write
    written = 0

    def die_half_way(fd: int, data) -> int:
        nonlocal written
        view = memoryview(data).cast("B")
        room = HALF - written
        if len(view) < room:  # still in the first half of the file: write normally
            written += real(fd, view)
            return len(view)
        real(fd, view[: max(1, room)])
        die()
        return 0  # not reached

    checkpoint_io._write = die_half_way


def arm_lightning() -> None:
    real = os.sendfile  # shutil.copyfile's fast path on Linux

    def half_then_die(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        real(out_fd, in_fd, offset, max(1, os.fstat(in_fd).st_size // 2))
        die()
        return 0  # not reached

    os.sendfile = half_then_die


def main(io_name: str, directory: str) -> None:
    io = checkpoint_io.AtomicCheckpointIO() if io_name == "atomic" else TorchCheckpointIO()
    target = Path(directory) / "last.ckpt"
    io.save_checkpoint(checkpoint(1.0), target)
    (arm_atomic if io_name == "atomic" else arm_lightning)()
    io.save_checkpoint(checkpoint(2.0), target)
    print("the second save finished: the crash was never triggered", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
