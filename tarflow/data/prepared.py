"""Prepared datasets: uint8 arrays on disk that every rank and DataLoader worker memory-maps.

``tarflow-prepare`` (:mod:`tarflow.data.prepare`) writes, and :class:`PreparedDataset` reads::

    manifest.json        written last, once every split is whole: format, dataset name, image
                         size, channels, classes, per-split counts and source fingerprints
    plan.json            the same facts, written first; only while a preparation is unfinished
    progress.json        the source parts already copied; only while unfinished
    train/images.npy     uint8 (N, C, S, S), C-order (".partial" suffix until the split is whole)
    train/labels.npy     int64 (N,), 0-based class ids
    val/...

Images are stored channel-first because that is what an item is, (C, S, S): a read is one
contiguous slice with no transpose, and the official npz rows are already channel-major, so
their preparation is a plain copy. ``.npy`` rather than a raw ``.bin`` because its header
carries shape and dtype, so a truncated or mismatched file is caught before it is read.

The arrays are opened with ``np.load(mmap_mode="r")`` (an ``np.memmap``) lazily in each process:
pages live once in the OS page cache, shared by all ranks and workers, instead of one private
copy of the whole set per process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tarflow.data.errors import DataError
from tarflow.data.imagenet_npz import read_npy_header
from tarflow.data.subsets import files_id
from tarflow.data.transforms import uint8_to_signed

__all__ = [
    "FORMAT",
    "MANIFEST",
    "PreparedDataset",
    "describe",
    "looks_prepared",
    "read_prepared",
]

FORMAT = "tarflow-prepared/1"
MANIFEST = "manifest.json"
DRAFT = "plan.json"
PROGRESS = "progress.json"
# Options of the plain readers that only matter while decoding sources: a prepared set has
# already been decoded, so they are accepted and have nothing left to do.
DECODE_OPTIONS = ("max_bad", "max_bad_fraction")


def array_files(split: str) -> dict[str, str]:
    """Relative paths of a split's arrays in a prepared directory."""
    return {"images": f"{split}/images.npy", "labels": f"{split}/labels.npy"}


def describe(facts: Mapping[str, Any]) -> str:
    """One phrase for a manifest or draft: ``imagenet64 64x64x3 from /src (sources 1a2b3c)``."""
    s, c = facts.get("img_size"), facts.get("channels")
    where = facts.get("source_root", "?")
    return f"{facts.get('name')} {s}x{s}x{c} from {where} (sources {facts.get('sources_id')})"


def looks_prepared(root: str | os.PathLike) -> bool:
    """True if ``root`` is, or was being made into, a prepared directory.

    A directory with a finished or unfinished preparation's files counts, so that a half-made
    one is refused with its own message rather than read as an (empty) image folder.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        return False
    for name in (MANIFEST, DRAFT):
        path = root / name
        if path.is_file():
            try:
                return str(json.loads(path.read_text()).get("format", "")).startswith(
                    "tarflow-prepared/"
                )
            except (OSError, ValueError):
                return name == DRAFT  # a draft is only ever ours; a broken manifest may not be
    return any((root / split / "images.npy").exists() for split in ("train", "val"))


def read_prepared(root: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a finished preparation.

    Raises:
        DataError: no manifest (an unfinished preparation), an unreadable one, or another format.
    """
    root = Path(root).expanduser()
    path = root / MANIFEST
    if not path.is_file():
        if (root / DRAFT).is_file():
            raise DataError(
                f"{root} is an unfinished preparation (no {MANIFEST}); run the same "
                "tarflow-prepare command again to finish it"
            )
        raise DataError(
            f"{root} has array files but no {MANIFEST}, so it is not a whole prepared set; "
            "prepare it again with tarflow-prepare into an empty directory"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not readable JSON ({err}); prepare the set again") from None
    if manifest.get("format") != FORMAT or not manifest.get("complete"):
        raise DataError(
            f"{path} is not a complete {FORMAT} manifest (format {manifest.get('format')!r}); "
            "prepare the set again with this version's tarflow-prepare"
        )
    return manifest


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a ``.npy`` file, from its header alone."""
    with open(path, "rb") as f:
        shape, dtype = read_npy_header(f)
        return shape, dtype, f.tell()


def check_array(path: Path, shape: tuple[int, ...], dtype: str) -> None:
    """Refuse a missing, truncated or mismatched array file before it is mapped."""
    try:
        got_shape, got_dtype, offset = _npy_layout(path)
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is missing or unreadable ({err}); prepare the set again") from None
    if tuple(got_shape) != tuple(shape) or got_dtype != np.dtype(dtype):
        raise DataError(
            f"{path} holds {got_dtype} {tuple(got_shape)} but its manifest says {dtype} "
            f"{tuple(shape)}; prepare the set again"
        )
    want = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size != want:
        raise DataError(
            f"{path} is {size} bytes but must be {want} (truncated or damaged); prepare the set "
            "again"
        )


class PreparedDataset(Dataset):
    """One split of a prepared directory as ``(x, y)`` pairs, read through ``np.memmap``.

    Items equal the plain reader's for the same source: the npz reader's, or the folder
    reader's with the image resized and centre-cropped at preparation time.

    The memory maps are opened on first access in each process and dropped when pickled, so a
    DataLoader worker or a spawned rank receives a few hundred bytes and maps the files itself;
    nothing copies the arrays into private memory.

    Attributes:
        root: the prepared directory.
        manifest: its manifest.
        name, img_size, channels, num_classes, class_names: the dataset's facts.
        flip: random horizontal flip (train split only).

    Args:
        root: a directory written by ``tarflow-prepare``.
        split: ``"train"`` or ``"val"``.
        flip: random horizontal flip; only the train split flips.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", *, flip: bool = True):
        self.root = Path(root).expanduser()
        self.manifest = read_prepared(self.root)
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(
                f"prepared set {self.root} holds the splits {sorted(splits)}, not {split!r}; "
                f"prepare that split too: tarflow-prepare {self.manifest.get('name')} "
                f"{self.manifest.get('source_root')} {self.root} --img-size "
                f"{self.manifest.get('img_size')} --splits {split}"
            )
        m = self.manifest
        self.name, self.img_size, self.channels = m["name"], int(m["img_size"]), int(m["channels"])
        self.num_classes = int(m["num_classes"])
        self.class_names = list(m.get("class_names") or [])
        self.split = split
        self.flip = bool(flip and split == "train")
        self._count = int(splits[split]["count"])
        files = array_files(split)
        self._images_path, self._labels_path = (
            self.root / files["images"],
            self.root / files["labels"],
        )
        shape = (self._count, self.channels, self.img_size, self.img_size)
        check_array(self._images_path, shape, "uint8")
        check_array(self._labels_path, (self._count,), "int64")
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    @property
    def images(self) -> np.ndarray:
        """uint8 (N, C, S, S) memory map (read-only)."""
        if self._images is None:
            self._images = np.load(self._images_path, mmap_mode="r")
        return self._images

    @property
    def labels(self) -> np.ndarray:
        """int64 (N,) memory map (read-only) of 0-based labels."""
        if self._labels is None:
            self._labels = np.load(self._labels_path, mmap_mode="r")
        return self._labels

    def __len__(self) -> int:
        return self._count

    def source_id(self, indices=None) -> str:
        """The split's identity: dataset, size, channels, its source's fingerprint from the
        manifest, and its array files' sizes and modification times (two sets prepared from
        look-alike sources differ; a split added later leaves this one's id unchanged)."""
        m = self.manifest
        facts = [m["name"], m["img_size"], m["channels"], self.split, self._count,
                 m["splits"][self.split].get("source")]
        names = [self._images_path.name, self._labels_path.name]
        return "prepared:" + files_id(self._images_path.parent, names, facts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return item ``index``.

        Returns:
            x: float32 (C, S, S) in [-1, 1], randomly flipped in training mode.
            y: int64 scalar label.
        """
        if not -self._count <= index < self._count:
            raise IndexError(f"index {index} out of range for {self._count} images in {self.root}")
        # np.array copies one image (C*S*S bytes) out of the map; torch needs a writable buffer.
        x = uint8_to_signed(torch.from_numpy(np.array(self.images[index])))
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, torch.tensor(int(self.labels[index]), dtype=torch.int64)

    def __getstate__(self) -> dict[str, Any]:
        # Workers and spawned ranks map the files themselves: the pages stay shared.
        return {**self.__dict__, "_images": None, "_labels": None}


def open_prepared(
    root: str | os.PathLike,
    *,
    name: str,
    img_size: int,
    split: str,
    channels: int,
    flip: bool,
    **kw,
) -> PreparedDataset:
    """A prepared split, checked against what the run is configured for.

    Raises:
        DataError: the set holds another dataset, size or channel count (one line naming both),
            or an option that a prepared set cannot honour.
    """
    class_names = kw.pop("class_names", None)
    unknown = sorted(k for k in kw if k not in DECODE_OPTIONS)
    if unknown:
        raise DataError(
            f"data options {unknown} do not apply to the prepared set {root}; remove them"
        )
    ds = PreparedDataset(root, split, flip=flip)
    asked = {"name": name, "img_size": int(img_size), "channels": int(channels)}
    held = {"name": ds.name, "img_size": ds.img_size, "channels": ds.channels}
    if held != asked:
        s = int(img_size)
        raise DataError(
            f"the prepared set {ds.root} holds {describe(ds.manifest)}, but this run reads "
            f"{name} {s}x{s}x{channels}; prepare that with tarflow-prepare into "
            "another directory, or configure the data it holds"
        )
    if class_names is not None and list(class_names) != ds.class_names:
        raise DataError(
            f"the prepared set {ds.root} has classes {ds.class_names[:5]}..., not the "
            f"configured {list(class_names)[:5]}...; prepare it again with those classes"
        )
    return ds
