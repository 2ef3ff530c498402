"""Unit tests for tarflow.data: every file is made under tmp_path, nothing is downloaded."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tarflow.data import (
    DataError,
    DataWarning,
    DigitsDataset,
    FakeImageDataset,
    ImageFolderDataset,
    ImageNetNpzDataset,
    afhq_dataset,
    build_dataset,
    drop_labels,
    export_to_folder,
    gaussian_noise,
    image_transform,
    uniform_dequantize,
    write_imagenet_npz,
)

# ---------------------------------------------------------------- helpers


def _rgb_array(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _write_images(directory: Path, count: int, size: int = 8, start: int = 0) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = directory / f"img_{i:03d}.png"
        Image.fromarray(_rgb_array(i, size)).save(path)
        paths.append(path)
    return paths


def _check_item(item, channels: int, size: int) -> None:
    x, y = item
    assert x.shape == (channels, size, size) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert y.dtype == torch.int64 and y.ndim == 0


def _npz_arrays(n: int = 12, size: int = 8, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return images, np.arange(n) % classes


def _all_items(ds) -> list:
    return [ds[i] for i in range(len(ds))]


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize("channels", [1, 3])
def test_image_transform_shape_and_range(channels):
    img = Image.fromarray(_rgb_array(0, 30)[:20])  # 20x30, not square
    x = image_transform(16, train=False, channels=channels)(img)
    assert x.shape == (channels, 16, 16) and x.dtype == torch.float32
    assert -1 <= x.min() and x.max() <= 1 and x.min() < 0 < x.max()


def test_image_transform_flip_switch():
    img = Image.fromarray(_rgb_array(1, 16))
    eval_x = image_transform(16, train=False)(img)
    assert torch.equal(image_transform(16, train=True, flip=False)(img), eval_x)
    torch.manual_seed(0)
    outs = [image_transform(16, train=True)(img) for _ in range(20)]
    assert any(torch.equal(o, eval_x.flip(-1)) for o in outs)
    assert all(torch.equal(o, eval_x) or torch.equal(o, eval_x.flip(-1)) for o in outs)


def test_gaussian_noise():
    x = torch.zeros(4, 3, 8, 8)
    a = gaussian_noise(x, 0.1, generator=torch.Generator().manual_seed(1))
    b = gaussian_noise(x, 0.1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and 0.05 < a.std() < 0.15
    assert gaussian_noise(x, 0.0) is x


def test_uniform_dequantize_stays_in_bin():
    levels = torch.arange(256, dtype=torch.float32).repeat(4)
    x = levels / 255 * 2 - 1  # what ToTensor + Normalize(0.5, 0.5) produce
    out = uniform_dequantize(x, generator=torch.Generator().manual_seed(0))
    assert out.min() >= -1 and out.max() < 1
    assert torch.equal(torch.floor((out + 1) / 2 * 256), levels)
    assert not torch.equal(out, uniform_dequantize(x))  # random within the bin


def test_drop_labels():
    y = torch.arange(1000) % 10
    assert torch.equal(drop_labels(y, 0.0), y)
    assert (drop_labels(y, 1.0) == -1).all()
    a = drop_labels(y, 0.3, generator=torch.Generator().manual_seed(0))
    b = drop_labels(y, 0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and 200 < (a == -1).sum() < 400
    kept = a != -1
    assert torch.equal(a[kept], y[kept])
    with pytest.raises(ValueError):
        drop_labels(y, 1.5)


# ---------------------------------------------------------------- demo and fake sets


def test_digits_dataset():
    train, val = DigitsDataset(16, split="train"), DigitsDataset(16, split="val")
    full = DigitsDataset(16, split="all")
    assert len(full) == 1797 and len(train) + len(val) == 1797
    assert DigitsDataset.num_classes == 10 and train.channels == 1 and train.img_size == 16
    _check_item(train[0], 1, 16)
    assert train.images.min() == -1 and train.images.max() == 1
    assert set(val.labels.tolist()) == set(range(10))  # stratified
    assert not set(train.indices) & set(val.indices)
    assert np.array_equal(DigitsDataset(16, split="val").indices, val.indices)  # same val
    assert not np.array_equal(DigitsDataset(16, split="val", seed=1).indices, val.indices)
    # At native size the upsampling is the identity.
    native = DigitsDataset(8, split="all")
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images).float()
    assert torch.allclose(native.images[:, 0], raw / 16 * 2 - 1)
    assert DigitsDataset(16, split="val", channels=3)[0][0].shape == (3, 16, 16)


def test_fake_dataset_is_deterministic():
    ds = FakeImageDataset(length=10, img_size=16, channels=3, num_classes=4, seed=0)
    first = _all_items(ds)
    for (xa, ya), (xb, yb) in zip(first, _all_items(ds), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    _check_item(first[0], 3, 16)
    assert [int(y) for _, y in first] == [i % 4 for i in range(10)]
    assert not torch.equal(first[0][0], first[4][0])
    assert not torch.equal(ds[0][0], FakeImageDataset(10, 16, 3, 4, seed=1)[0][0])
    assert int(FakeImageDataset(5, num_classes=0)[3][1]) == 0
    with pytest.raises(IndexError):
        ds[10]


# ---------------------------------------------------------------- ImageNet npz


def test_npz_and_folder_readers_agree(tmp_path):
    images, labels = _npz_arrays()
    path = write_imagenet_npz(tmp_path / "val_data", images, labels)
    npz = ImageNetNpzDataset(path, 8, train=True, flip=False)
    assert len(npz) == 12 and npz.images.shape == (12, 3, 8, 8)
    assert np.array_equal(npz.images, images.transpose(0, 3, 1, 2))
    folder = ImageFolderDataset(export_to_folder(npz, tmp_path / "png"), 8, train=True, flip=False)
    assert len(folder) == len(npz) and folder.num_classes == 4
    for i in range(len(folder)):
        x, y = folder[i]
        xn, yn = npz[int(folder.path(i).stem)]
        assert torch.equal(x, xn) and int(y) == int(yn)


def test_npz_writer_layouts_and_directory(tmp_path):
    images, labels = _npz_arrays()
    write_imagenet_npz(tmp_path / "hwc.npz", images, labels)
    write_imagenet_npz(tmp_path / "chw.npz", images.transpose(0, 3, 1, 2), labels)
    assert np.array_equal(
        np.load(tmp_path / "hwc.npz")["data"], np.load(tmp_path / "chw.npz")["data"]
    )
    # Directory mode: batches in numeric order (batch_2 before batch_10), val separately.
    d = tmp_path / "official"
    for batch, lo in [(10, 8), (1, 0), (2, 4)]:
        write_imagenet_npz(
            d / f"train_data_batch_{batch}.npz",
            images[lo : lo + 4],
            labels[lo : lo + 4],
            compress=True,
        )
    write_imagenet_npz(d / "val_data.npz", images[:3], labels[:3])
    train = ImageNetNpzDataset(d, 8, train=True)
    assert [f.name for f in train.files][-1] == "train_data_batch_10.npz"
    assert np.array_equal(train.images, images.transpose(0, 3, 1, 2))
    assert np.array_equal(train.labels, labels)
    assert len(ImageNetNpzDataset(d, 8, train=False)) == 3


@pytest.mark.parametrize(
    "arrays, expected",
    [
        ({"data": np.zeros((2, 100), np.uint8), "labels": np.ones(2)}, "columns"),
        ({"data": np.zeros((2, 3 * 16 * 16), np.uint8), "labels": np.ones(2)}, "16x16"),
        ({"data": np.zeros((2, 192), np.float32), "labels": np.ones(2)}, "uint8"),
        ({"data": np.zeros((2, 192), np.uint8), "labels": np.array([1, 0])}, "outside"),
        ({"data": np.zeros((2, 192), np.uint8), "labels": np.array([1, 1001])}, "outside"),
        ({"data": np.zeros((2, 192), np.uint8), "labels": np.array([1, 2, 3])}, "rows"),
        ({"data": np.zeros((2, 192), np.uint8)}, "labels"),
        ({"labels": np.ones(2, np.int64)}, "data"),
    ],
)
def test_npz_validation_errors(tmp_path, arrays, expected):
    path = tmp_path / "bad.npz"
    np.savez(path, **{k: (v.astype(np.int64) if k == "labels" else v) for k, v in arrays.items()})
    with pytest.raises(DataError) as info:
        ImageNetNpzDataset(path, 8)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_npz_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageNetNpzDataset(tmp_path / "nowhere", 8)
    with pytest.raises(DataError, match="train_data_batch"):
        ImageNetNpzDataset(tmp_path, 8)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        ImageNetNpzDataset(tmp_path / "junk.npz", 8)


# ---------------------------------------------------------------- image folders


def test_folder_class_layout_and_flat_layout(tmp_path):
    _write_images(tmp_path / "cls" / "b", 2)
    _write_images(tmp_path / "cls" / "a", 3)
    ds = ImageFolderDataset(tmp_path / "cls", 8, train=False)
    assert ds.class_names == ["a", "b"] and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    _check_item(ds[4], 3, 8)
    flat = ImageFolderDataset(_write_images(tmp_path / "flat", 3)[0].parent, 8)
    assert flat.num_classes == 0 and {int(flat[i][1]) for i in range(3)} == {0}
    explicit = ImageFolderDataset(tmp_path / "cls", 8, class_names=["b", "a"])
    assert explicit.labels.tolist() == [0, 0, 1, 1, 1]
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers need this
    assert torch.equal(clone[3][0], ds[3][0]) and clone.path(3) == ds.path(3)


def test_folder_missing_and_empty_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        ImageFolderDataset(tmp_path / "does_not_exist", 8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(DataError) as info:
        ImageFolderDataset(tmp_path / "empty", 8)
    assert str(tmp_path / "empty") in str(info.value) and ".png" in str(info.value)
    (tmp_path / "cls" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="class directory"):
        ImageFolderDataset(tmp_path / "cls", 8)
    with pytest.raises(FileNotFoundError, match="zebra"):
        ImageFolderDataset(tmp_path / "cls", 8, class_names=["a", "zebra"])


def test_folder_converts_modes(tmp_path):
    d = tmp_path / "modes"
    d.mkdir()
    rgb = Image.fromarray(_rgb_array(0, 12))
    rgb.convert("L").save(d / "gray.png")
    rgb.convert("RGBA").save(d / "rgba.png")
    rgb.convert("P").save(d / "palette.png")
    pal = rgb.convert("P")
    pal.info["transparency"] = 0
    pal.save(d / "palette_transparent.png", transparency=0)
    rgb.save(d / "photo.JPEG")
    ds = ImageFolderDataset(d, 8, train=False)
    assert len(ds) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no bad-file or PIL palette warnings
        for item in _all_items(ds):
            _check_item(item, 3, 8)
        _check_item(ImageFolderDataset(d, 8, channels=1)[1], 1, 8)


def test_folder_skips_few_bad_files(tmp_path):
    d = tmp_path / "some_bad"
    good = _write_images(d, 20)
    (d / "img_garbage.png").write_bytes(b"this is not an image")
    truncated = good[5].read_bytes()
    (d / "img_truncated.png").write_bytes(truncated[: len(truncated) // 2])
    ds = ImageFolderDataset(d, 8)
    with pytest.warns(DataWarning) as record:
        items = _all_items(ds)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    for name in ("img_garbage.png", "img_truncated.png"):
        assert any(name in m for m in messages) and any(name in p for p in ds.bad_files)
    assert len(ds.bad_files) == 2
    for item in items:
        _check_item(item, 3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already known: no second warning, same substitute
        assert all(torch.equal(a[1], b[1]) for a, b in zip(items, _all_items(ds), strict=True))
    assert len(ds.bad_files) == 2


def test_folder_too_many_bad_files(tmp_path):
    d = tmp_path / "mostly_bad"
    _write_images(d, 3)
    for i in range(4):
        (d / f"img_bad_{i}.jpg").write_bytes(b"\xff\xd8\xff garbage")
    ds = ImageFolderDataset(d, 8, max_bad=2)
    with pytest.raises(DataError, match="img_bad_2.jpg") as info, pytest.warns(DataWarning):
        _all_items(ds)
    assert "3 unreadable" in str(info.value) and str(d) in str(info.value)


def test_afhq_helper(tmp_path):
    for split in ("train", "val"):
        for i, cls in enumerate(("wild", "cat", "dog")):
            _write_images(tmp_path / split / cls, 2, start=3 * i)
    ds = afhq_dataset(tmp_path, 8, "val")
    assert ds.class_names == ["cat", "dog", "wild"] and ds.name == "afhq"
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(FileNotFoundError, match="test"):
        afhq_dataset(tmp_path / "test", 8)


# ---------------------------------------------------------------- build_dataset


def test_build_dataset_all_names(tmp_path):
    demo = build_dataset("demo", img_size=16, split="val", channels=1)
    assert demo.num_classes == 10 and demo[0][0].shape == (1, 16, 16)
    fake = build_dataset("fake", img_size=8, length=5, num_classes=3)
    assert len(fake) == 5 and fake.num_classes == 3
    assert not torch.equal(fake[0][0], build_dataset("fake", img_size=8, split="val")[0][0])

    images, labels = _npz_arrays()
    write_imagenet_npz(tmp_path / "npz" / "train_data_batch_1.npz", images, labels)
    write_imagenet_npz(tmp_path / "npz" / "val_data.npz", images[:5], labels[:5])
    ds = build_dataset("imagenet64", root=tmp_path / "npz", img_size=8, split="val")
    assert isinstance(ds, ImageNetNpzDataset) and len(ds) == 5 and ds.num_classes == 1000
    one = build_dataset("imagenet64", root=tmp_path / "npz" / "val_data.npz", img_size=8)
    assert len(one) == 5

    for split in ("train", "val"):
        for wnid in ("n01", "n02"):
            _write_images(tmp_path / "in" / split / wnid, 2)
    ds = build_dataset("imagenet64", root=str(tmp_path / "in"), img_size=8, split="val")
    assert isinstance(ds, ImageFolderDataset) and ds.class_names == ["n01", "n02"]
    ds = build_dataset("imagenet128", root=tmp_path / "in", img_size=16, max_bad=1)
    assert ds.name == "imagenet128" and ds.root == tmp_path / "in" / "train"
    _check_item(ds[0], 3, 16)
    flat = build_dataset("imagenet128", root=tmp_path / "in" / "val" / "n01", img_size=8)
    assert flat.num_classes == 0

    for cls in ("cat", "dog", "wild"):
        _write_images(tmp_path / "afhq" / "train" / cls, 1)
    afhq = build_dataset("afhq", root=tmp_path / "afhq", img_size=8)
    assert afhq.num_classes == 3 and len(afhq) == 3


def test_build_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="imagenet128"):
        build_dataset("cifar10", img_size=32)
    for name in ("imagenet64", "imagenet128", "afhq"):
        with pytest.raises(ValueError, match="root"):
            build_dataset(name, img_size=64)
    with pytest.raises(FileNotFoundError, match="missing_root"):
        build_dataset("imagenet64", root=tmp_path / "missing_root", img_size=64)
    _write_images(tmp_path / "in" / "train" / "n01", 1)
    with pytest.raises(FileNotFoundError, match="val"):
        build_dataset("imagenet128", root=tmp_path / "in", img_size=8, split="val")
