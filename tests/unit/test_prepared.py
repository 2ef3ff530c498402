"""Prepared datasets: tarflow-prepare's output equals the plain readers, resumes after a crash,
refuses half-written or mismatched sets, and is read through shared memory maps."""

from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tarflow.cli.prepare import main as prepare_main
from tarflow.data import (
    DataError,
    DataWarning,
    ImageFolderDataset,
    ImageNetNpzDataset,
    PreparedDataset,
    build_dataset,
    prepare_dataset,
    write_imagenet_npz,
)


class Crash(Exception):
    """Stands for a kill in the middle of a preparation."""


def _npz_source(root: Path, sizes=(5, 7, 6), val: int = 4, side: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for k, n in enumerate(sizes, start=1):
        images = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
        write_imagenet_npz(root / f"train_data_batch_{k}", images, rng.integers(0, 1000, n))
    images = rng.integers(0, 256, (val, side, side, 3), dtype=np.uint8)
    write_imagenet_npz(root / "val_data", images, rng.integers(0, 1000, val))
    return root


def _folder_source(root: Path, per_class: int = 4) -> Path:
    """root/{train,val}/{a,b}/*.png of various non-square sizes and modes, so the resize and
    centre crop matter."""
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class if split == "train" else 2):
                h, w = 10 + 3 * i, 14 + 2 * c
                img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                img = img.convert("L") if i == 1 else img
                img.save(root / split / cls / f"{i:02d}.png")
    return root


def _same_items(a, b) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        (xa, ya), (xb, yb) = a[i], b[i]
        assert torch.equal(xa, xb) and int(ya) == int(yb), i


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.npy"))}


def test_npz_prepared_equals_npz_reader(tmp_path):
    src = _npz_source(tmp_path / "src")
    manifest, copied = prepare_dataset("imagenet64", src, tmp_path / "out", img_size=8)
    assert copied and manifest["splits"]["train"]["count"] == 18
    assert [f["name"] for f in manifest["splits"]["train"]["source"]["files"]] == [
        "train_data_batch_1.npz",
        "train_data_batch_2.npz",
        "train_data_batch_3.npz",
    ]
    for split in ("train", "val"):
        ds = build_dataset("imagenet64", root=tmp_path / "out", img_size=8, split=split, flip=False)
        assert isinstance(ds, PreparedDataset) and ds.num_classes == 1000
        _same_items(ds, ImageNetNpzDataset(src, 8, train=split == "train", flip=False))
    # With flips on, every item is the image or its mirror, and both occur.
    flipped = build_dataset("imagenet64", root=tmp_path / "out", img_size=8, split="train")
    ref = ImageNetNpzDataset(src, 8, train=True, flip=False)
    torch.manual_seed(0)
    mirrored = []
    for i in range(len(ref)):
        x, r = flipped[i][0], ref[i][0]
        assert torch.equal(x, r) or torch.equal(x, r.flip(-1))
        mirrored.append(not torch.equal(x, r))
    assert any(mirrored) and not all(mirrored)


@pytest.mark.parametrize("channels", [3, 1])
def test_folder_prepared_equals_folder_reader(tmp_path, channels):
    src = _folder_source(tmp_path / "src")
    (src / "train" / "b" / "99_broken.png").write_bytes(b"not a png")  # replaced by a neighbour
    with pytest.warns(DataWarning, match="Unreadable image"):
        manifest, _ = prepare_dataset(
            "imagenet128", src, tmp_path / "out", img_size=6, channels=channels, chunk=3
        )
    assert manifest["class_names"] == ["a", "b"]
    assert manifest["splits"]["train"]["parts"] == [3, 3, 3]
    assert manifest["splits"]["train"]["substituted"] == [str(src / "train/b/99_broken.png")]
    for split in ("train", "val"):
        ds = build_dataset(
            "imagenet128",
            root=tmp_path / "out",
            img_size=6,
            split=split,
            channels=channels,
            flip=False,
        )
        assert ds.images.shape[1:] == (channels, 6, 6)
        bad = pytest.warns(DataWarning) if split == "train" else contextlib.nullcontext()
        with bad:  # the folder reader walks past the broken file the same way
            _same_items(ds, ImageFolderDataset(src / split, 6, channels=channels, train=False))


@pytest.mark.parametrize("kind", ["npz", "folder"])
def test_interrupted_preparation_resumes(tmp_path, kind):
    if kind == "npz":
        src, name, kw = _npz_source(tmp_path / "src"), "imagenet64", {"img_size": 8}
    else:
        src, name, kw = _folder_source(tmp_path / "src"), "afhq", {"img_size": 6, "chunk": 3}
        for split in ("train", "val"):  # AFHQ's class names
            for old, new in (("a", "cat"), ("b", "dog")):
                (src / split / old).rename(src / split / new)
            (src / split / "wild").mkdir()
            Image.new("RGB", (9, 7), (1, 2, 3)).save(src / split / "wild" / "w.png")
    clean, _ = prepare_dataset(name, src, tmp_path / "clean", **kw)

    def crash_after_first(split, n):
        raise Crash

    out = tmp_path / "out"
    with pytest.raises(Crash):
        prepare_dataset(name, src, out, progress=crash_after_first, **kw)
    # Nothing a reader accepts yet, and the message says how to finish.
    with pytest.raises(DataError, match="unfinished preparation.*run the same tarflow-prepare"):
        build_dataset(name, root=out, img_size=kw["img_size"])
    seen, states = [], []
    manifest, copied = prepare_dataset(
        name,
        src,
        out,
        progress=lambda s, n: seen.append((s, n)),
        on_draft=lambda p, state, done: states.append((state, done)),
        **kw,
    )
    first = clean["splits"]["train"]["parts"][0]
    assert copied and states == [("resume", first)]
    total = sum(s["count"] for s in clean["splits"].values())
    assert sum(n for _, n in seen) == total - first  # the recorded part was not copied again
    assert _files(out) == _files(tmp_path / "clean")
    assert {k: v for k, v in manifest.items() if k != "source_root"} == {
        k: v for k, v in clean.items() if k != "source_root"
    }
    assert sorted(p.name for p in out.iterdir()) == [  # a finished set keeps no lock file
        "manifest.json",
        "train",
        "val",
    ]


def test_resume_guards(tmp_path):
    """A second preparation of the same directory at once is refused; a resume whose partial
    file was deleted does not fill the recorded parts with zeros."""
    import fcntl

    src = _npz_source(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".prepare.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(DataError, match="another tarflow-prepare is writing"):
            prepare_dataset("imagenet64", src, out, img_size=8)

    def crash(split, n):
        raise Crash

    with pytest.raises(Crash):
        prepare_dataset("imagenet64", src, out, img_size=8, progress=crash)
    (out / "train" / "images.npy.partial").unlink()
    with pytest.raises(DataError, match="images.npy.partial is gone"):
        prepare_dataset("imagenet64", src, out, img_size=8)


def test_half_written_sets_are_refused(tmp_path):
    src = _npz_source(tmp_path / "src")
    out = tmp_path / "out"
    prepare_dataset("imagenet64", src, out, img_size=8)
    images = out / "train" / "images.npy"
    data = images.read_bytes()
    images.write_bytes(data[:-100])
    with pytest.raises(DataError, match="truncated or damaged"):
        build_dataset("imagenet64", root=out, img_size=8)
    images.write_bytes(data)
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest.json, so it is not a whole prepared set"):
        build_dataset("imagenet64", root=out, img_size=8)


def _cli(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        prepare_main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return exit_info.value.code, err[0]


def test_cli_refuses_other_sources_and_sizes_in_one_line(tmp_path, capsys):
    src = _folder_source(tmp_path / "src")
    other = _folder_source(tmp_path / "other", per_class=3)
    out = tmp_path / "out"
    assert prepare_main(["imagenet128", str(src), str(out), "--img-size", "6", "--workers=0"]) == 0
    assert "prepared:" in capsys.readouterr().out
    assert prepare_main(["imagenet128", str(src), str(out), "--img-size", "6"]) == 0
    assert "already prepared" in capsys.readouterr().out
    code, line = _cli(capsys, "imagenet128", other, out, "--img-size", "6")
    assert code == 2 and f"from {src}" in line and f"from {other}" in line
    code, line = _cli(capsys, "imagenet128", src, out, "--img-size", "7")
    assert code == 2 and "6x6x3" in line and "7x7x3" in line
    # A run configured for another size is refused by the reader in one line, naming both.
    with pytest.raises(DataError, match=r"holds imagenet128 6x6x3 .* reads imagenet128 8x8x3"):
        build_dataset("imagenet128", root=out, img_size=8)
    with pytest.raises(DataError, match=r"holds imagenet128 .* reads afhq"):
        build_dataset("afhq", root=out, img_size=6)


def test_cli_bad_input_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    code, line = _cli(capsys, "imagenet64", tmp_path / "missing", out)
    assert code == 2 and "does not exist" in line
    (tmp_path / "empty").mkdir()
    code, line = _cli(capsys, "imagenet64", tmp_path / "empty", out)
    assert code == 2 and "No images" in line
    src = _npz_source(tmp_path / "src")
    code, line = _cli(capsys, "imagenet64", src, out)  # 8x8 files, default size 64
    assert code == 2 and "holds 8x8 images" in line and "img_size=64" in line
    assert not out.exists()


def test_memory_maps_are_opened_per_process_and_never_pickled(tmp_path):
    src = _npz_source(tmp_path / "src", sizes=(40, 40))
    prepare_dataset("imagenet64", src, tmp_path / "out", img_size=8)
    ds = build_dataset("imagenet64", root=tmp_path / "out", img_size=8, flip=False)
    assert ds._images is None  # nothing mapped until an item is read
    x0 = ds[3][0]
    assert isinstance(ds.images, np.memmap) and not ds.images.flags.writeable
    blob = pickle.dumps(ds)
    assert len(blob) < 4096 < ds.images.nbytes  # a worker gets the paths, not the pixels
    copy = pickle.loads(blob)
    assert copy._images is None and torch.equal(copy[3][0], x0)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2)
    batches = list(loader)
    assert torch.equal(
        torch.cat([x for x, _ in batches]), torch.stack([ds[i][0] for i in range(len(ds))])
    )


def test_rank_probes_a_prepared_set(tmp_path, capsys):
    from tarflow.cli.rank import main as rank_main

    src = _folder_source(tmp_path / "src")
    prepare_dataset("imagenet128", src, tmp_path / "out", img_size=8, channels=1)
    args = ["--preset", "tiny", "--device", "cpu", "--probe", "4"]
    assert rank_main([*args, "--data", "imagenet128", "--root", str(tmp_path / "out")]) == 0
    assert "probe: 4 imagenet128 images" in capsys.readouterr().out


def test_npz_reader_points_large_sets_to_tarflow_prepare(tmp_path, monkeypatch):
    from tarflow.data import imagenet_npz

    src = _npz_source(tmp_path / "src")
    monkeypatch.setattr(imagenet_npz, "LARGE_BYTES", 18 * 3 * 8 * 8 - 1)
    with pytest.warns(DataWarning, match="tarflow-prepare"):
        ImageNetNpzDataset(src, 8)
    monkeypatch.setattr(imagenet_npz, "LARGE_BYTES", 18 * 3 * 8 * 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImageNetNpzDataset(src, 8)
