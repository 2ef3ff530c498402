"""tarflow-prepare: a split added later joins the prepared set, and image sizes the source
cannot give are refused in one line before anything is written (issue 30, items 11 and 12)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tarflow.cli.prepare import main as prepare_main
from tarflow.data import DataError, build_dataset, prepare_dataset


def _folder(root: Path, splits=("train", "val"), per_class: int = 3) -> Path:
    """root/<split>/{a,b}/*.png, 12x16 RGB (short side 12)."""
    rng = np.random.default_rng(per_class)
    for split in splits:
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
                img.save(root / split / cls / f"{i}.png")
    return root


def _refused(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        prepare_main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_a_split_prepared_later_joins_the_set(tmp_path, capsys):
    src, out = _folder(tmp_path / "src"), tmp_path / "out"
    assert prepare_main(["imagenet128", str(src), str(out), "--img-size", "8", "--splits", "train",
                         "--workers", "0"]) == 0
    train_bytes = _bytes(out / "train")
    with pytest.raises(DataError, match="prepare that split too") as info:
        build_dataset("imagenet128", root=out, img_size=8, split="val")
    assert "--splits val" in str(info.value)
    # Following the advice adds the split; the train arrays are kept as they were.
    assert prepare_main(["imagenet128", str(src), str(out), "--img-size", "8", "--splits", "val",
                         "--workers", "0"]) == 0
    assert "prepared:" in capsys.readouterr().out
    assert _bytes(out / "train") == train_bytes
    assert not (out / "plan.json").exists() and not (out / "progress.json").exists()
    for split in ("train", "val"):
        prepared = build_dataset("imagenet128", root=out, img_size=8, split=split, flip=False)
        plain = build_dataset("imagenet128", root=src, img_size=8, split=split, flip=False)
        assert len(prepared) == len(plain) == 6
        for i in range(len(plain)):
            assert np.array_equal(prepared[i][0].numpy(), plain[i][0].numpy()), (split, i)
    # Asking for both again, or the default (what the source has), finds them all.
    assert prepare_main(["imagenet128", str(src), str(out), "--img-size", "8"]) == 0
    assert "already prepared" in capsys.readouterr().out
    # Another source's split is still refused, and nothing changes.
    other = _folder(tmp_path / "other", per_class=2)
    before = _bytes(out)
    line = _refused(capsys, "imagenet128", other, out, "--img-size", "8")
    assert f"from {src}" in line and f"from {other}" in line
    assert _bytes(out) == before


def test_an_interrupted_added_split_resumes(tmp_path):
    src, out = _folder(tmp_path / "src"), tmp_path / "out"
    prepare_dataset("imagenet128", src, out, img_size=8, splits=["train"], chunk=2)

    class Crash(Exception):
        pass

    def crash(split, n):
        raise Crash

    with pytest.raises(Crash):
        prepare_dataset(
            "imagenet128", src, out, img_size=8, splits=["val"], chunk=2, progress=crash
        )
    # The set stays readable (its train split) while the new split is unfinished.
    assert len(build_dataset("imagenet128", root=out, img_size=8, split="train")) == 6
    manifest, copied = prepare_dataset("imagenet128", src, out, img_size=8, splits=["val"], chunk=2)
    assert copied and sorted(manifest["splits"]) == ["train", "val"]
    assert len(build_dataset("imagenet128", root=out, img_size=8, split="val")) == 6


@pytest.mark.parametrize("size", ["0", "-3", "13", "100000"])
def test_sizes_the_source_cannot_give_are_refused_before_writing(tmp_path, capsys, size):
    src, out = _folder(tmp_path / "src"), tmp_path / "out"
    line = _refused(capsys, "imagenet128", src, out, "--img-size", size)
    assert "--img-size" in line and size in line
    assert not out.exists()


def test_the_largest_size_the_source_gives_is_accepted(tmp_path):
    src = _folder(tmp_path / "src")
    manifest, _ = prepare_dataset("imagenet128", src, tmp_path / "out", img_size=12)
    assert manifest["img_size"] == 12


def test_a_set_larger_than_the_free_disk_space_is_refused(tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    src, out = _folder(tmp_path / "src"), tmp_path / "out"
    line = _refused(capsys, "imagenet128", src, out, "--img-size", "8")
    assert "free" in line and str(out) in line
    assert not out.exists()
