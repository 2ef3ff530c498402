"""The package's one atomic write (tarflow.files): all or nothing, nothing left behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from tarflow.files import atomic_torch_save, atomic_write


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_a_failing_writer_leaves_the_old_bytes_and_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    atomic_write(path, b"old bytes\n")

    def half_then_fail(handle) -> None:
        handle.write(b"new by")
        handle.flush()  # the half reaches the temporary file, not just a buffer
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old bytes\n"
    assert _leftovers(tmp_path) == []


def test_text_bytes_and_writers_land_whole_with_the_usual_mode(tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir" / "out.txt"  # missing directories are created
    assert atomic_write(target, "grüße\n") == target
    assert target.read_text(encoding="utf-8") == "grüße\n"
    atomic_write(target, lambda handle: handle.write(Path(handle.name).name.encode()))
    written = target.read_text()
    assert written.startswith(".out.txt.") and written.endswith(".tmp")  # the writer's own name
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600
    assert _leftovers(target.parent) == []


def test_torch_save_round_trips_and_a_failed_low_level_write_keeps_the_old_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "weights.pt"
    first = {"w": torch.arange(300_000, dtype=torch.float32)}  # ~1.2 MB: several writes
    atomic_torch_save(first, path)
    calls = []

    def fail_on_the_second_write(fd: int, data) -> int:
        calls.append(len(data))
        if len(calls) == 2:
            os.write(fd, memoryview(data).cast("B")[: len(data) // 2])
            raise OSError(errno.EIO, "I/O error (injected)")
        return os.write(fd, data)

    # torch's zip writer may report the failure as its own RuntimeError, raised while closing.
    with pytest.raises((OSError, RuntimeError)) as caught:
        atomic_torch_save({"w": -first["w"]}, path, write=fail_on_the_second_write)
    chain = [caught.value, caught.value.__context__, caught.value.__cause__]
    assert any("injected" in str(e) for e in chain if e is not None)
    assert torch.equal(torch.load(path, weights_only=True)["w"], first["w"])
    assert _leftovers(tmp_path) == []


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    from tarflow.files import atomic_dir

    out = tmp_path / "ae"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("crash while saving")
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # the earlier directory is untouched
    with atomic_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("new")
    assert (out / "sub" / "new.txt").read_text() == "new" and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae"]  # no temporary left beside it
