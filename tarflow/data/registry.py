"""The dataset registry: :func:`build_dataset` picks a dataset by its config name.

Every dataset yields ``(x, y)``: x float32 (C, H, W) in [-1, 1], y an int64 scalar (0 for
unconditional data), and has ``num_classes`` (0 = unconditional), ``img_size``, ``channels`` and
``name`` attributes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from tarflow.data.demo import DigitsDataset
from tarflow.data.fake import FakeImageDataset
from tarflow.data.folder import ImageFolderDataset, afhq_dataset
from tarflow.data.imagenet_npz import ImageNetNpzDataset
from tarflow.data.prepared import looks_prepared, open_prepared

# Dataset names that read files, with the training size their data config uses: the ones
# ``tarflow-prepare`` can write a prepared directory for.
PREPARABLE = {"imagenet64": 64, "imagenet128": 128, "imagenet256": 256, "afhq": 256}
# Data config names (``data=afhq256``) that differ from their dataset's name: accepted too.
ALIASES = {"afhq256": "afhq"}


def dataset_name(name: str) -> str:
    """The registry name of ``name`` (an alias such as ``afhq256`` is ``afhq``); argparse's
    ``type=`` of the commands' dataset arguments."""
    return ALIASES.get(name, name)


def _need_root(name: str, root: str | os.PathLike | None) -> Path:
    if root is None:
        raise ValueError(
            f"Dataset {name!r} reads from disk: set its directory with the `data.root` config "
            "key (the `root` argument of build_dataset)."
        )
    return Path(root).expanduser()


def _split_dir(root: Path, split: str) -> Path:
    """``root/<split>`` if it exists; else ``root`` itself unless root is split into parts.

    Falling back to a split-structured root would turn ``train/`` into a class, so that case
    is an error instead.
    """
    if (root / split).is_dir():
        return root / split
    if (root / "train").is_dir() or (root / "val").is_dir():
        raise FileNotFoundError(
            f"{root / split} does not exist but {root} has train/val sub-directories; create "
            f"the {split!r} split or choose another split."
        )
    return root


def _demo(root, img_size, split, channels, flip, **kw) -> Dataset:
    # No flip for digits, whatever `flip` says; root is not needed (data ships with sklearn).
    return DigitsDataset(img_size, split=split, channels=channels, **kw)


def _fake(root, img_size, split, channels, flip, **kw) -> Dataset:
    # Val gets a different seed so train and val images differ, as in a real split.
    seed = kw.pop("seed", 0) + (0 if split == "train" else 1)
    return FakeImageDataset(img_size=img_size, channels=channels, seed=seed, **kw)


def _imagenet64(root, img_size, split, channels, flip, **kw) -> Dataset:
    path = _need_root("imagenet64", root)
    is_npz = path.suffix == ".npz" if path.is_file() else any(path.glob("*.npz"))
    if is_npz:
        if split not in ("train", "val"):
            raise ValueError(f"ImageNet npz files have 'train' and 'val' splits, not {split!r}")
        if channels != 3:
            raise ValueError(f"ImageNet npz files are RGB; set channels=3 (got {channels})")
        return ImageNetNpzDataset(path, img_size, train=split == "train", flip=flip, **kw)
    return _folder("imagenet64", path, img_size, split, channels, flip, **kw)


def _imagenet_folder(name: str) -> Callable[..., Dataset]:
    """The reader of an ImageNet image folder registered as ``name`` (any resolution)."""

    def build(root, img_size, split, channels, flip, **kw) -> Dataset:
        return _folder(name, _need_root(name, root), img_size, split, channels, flip, **kw)

    return build


def _folder(name, root, img_size, split, channels, flip, **kw) -> Dataset:
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise FileNotFoundError(f"Dataset {name!r}: root {root} {what}; check data.root.")
    kw.setdefault("name", name)
    return ImageFolderDataset(
        _split_dir(root, split),
        img_size,
        channels=channels,
        train=split == "train",
        flip=flip,
        **kw,
    )


def _afhq(root, img_size, split, channels, flip, **kw) -> Dataset:
    return afhq_dataset(
        _need_root("afhq", root), img_size, split, channels=channels, flip=flip, **kw
    )


DATASETS: dict[str, Callable[..., Dataset]] = {
    "demo": _demo,
    "fake": _fake,
    "imagenet64": _imagenet64,
    "imagenet128": _imagenet_folder("imagenet128"),
    "imagenet256": _imagenet_folder("imagenet256"),
    "afhq": _afhq,
}


def build_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    img_size: int,
    split: str = "train",
    channels: int = 3,
    flip: bool = True,
    **kw,
) -> Dataset:
    """Build a dataset by registry name.

    Names:
        * ``demo``: scikit-learn digits (no root; ``channels=1`` gives the native gray images,
          3 repeats the plane). Extra kw: ``val_fraction``, ``seed``.
        * ``fake``: :class:`FakeImageDataset` (no root). Extra kw: ``length``, ``num_classes``,
          ``seed``.
        * ``imagenet64``: ``root`` is an image folder, or an official ``.npz`` file / directory
          of them (chosen by the presence of ``.npz`` files).
        * ``imagenet128``, ``imagenet256``: image folder; ``root/<split>`` if present, else
          ``root``.
        * ``afhq``: ``root/{train,val}/{cat,dog,wild}``.

        For the names that read from disk, ``root`` may instead be a directory written by
        ``tarflow-prepare`` (found by its manifest): a :class:`PreparedDataset` then reads the
        prepared uint8 arrays through ``np.memmap``, after checking that they hold this
        dataset at this size.

    Args:
        name: registry name (see above).
        root: data location, for the datasets that read from disk.
        img_size: output side S.
        split: ``"train"`` or ``"val"`` (``"all"`` also for demo); only train flips.
        channels: image channels C.
        flip: random horizontal flip for the train split (not for demo / fake).
        **kw: dataset-specific options, e.g. ``max_bad`` for image folders.

    Returns:
        A map-style dataset of ``(x (C, S, S) float32 in [-1, 1], y int64 scalar)``.
    """
    name = dataset_name(name)
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; known datasets: {sorted(DATASETS)}")
    if root is not None and name in PREPARABLE and looks_prepared(root):
        return open_prepared(
            root, name=name, img_size=img_size, split=split, channels=channels, flip=flip, **kw
        )
    return DATASETS[name](root, img_size, split, channels, flip, **kw)
