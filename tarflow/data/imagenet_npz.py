"""Reader and writer for the official downsampled-ImageNet ``.npz`` files.

Format (Chrabaszcz et al., 2017): ``train_data_batch_1.npz`` ... ``train_data_batch_10.npz`` and
``val_data.npz``, each with ``data`` (n, 3*S*S) uint8 rows stored channel-major (the S*S red
plane, then green, then blue, each row-major) and ``labels`` (n,) 1-based class ids in
[1, 1000]. An optional ``mean`` key is ignored.
"""

from __future__ import annotations

import math
import os
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tarflow.data.errors import DataError, DataWarning
from tarflow.data.subsets import files_id
from tarflow.data.transforms import uint8_to_signed

__all__ = [
    "ImageNetNpzDataset",
    "check_header",
    "export_to_folder",
    "npz_files",
    "read_npz",
    "write_imagenet_npz",
]

NUM_CLASSES = 1000
# Above this many bytes of pixels the reader suggests tarflow-prepare: every process (rank)
# holds its own copy, e.g. ~15.7 GB each for the ImageNet64 train set.
LARGE_BYTES = 2 << 30
_TRAIN_GLOB = "train_data_batch_*.npz"
_VAL_NAME = "val_data.npz"


def npz_files(path_or_dir: str | os.PathLike, *, train: bool = True) -> list[Path]:
    """The ``.npz`` files a path stands for.

    Args:
        path_or_dir: one ``.npz`` file, or a directory holding the official files.
        train: for a directory, pick ``train_data_batch_*.npz`` (True) or ``val_data.npz``.

    Returns:
        Files in batch order (``batch_2`` before ``batch_10``).
    """
    path = Path(path_or_dir).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"ImageNet npz path {path} does not exist; check the root path.")
    if train:

        def batch_number(p: Path) -> tuple[int, str]:
            m = re.search(r"(\d+)\.npz$", p.name)
            return (int(m.group(1)) if m else -1, p.name)

        files = sorted(path.glob(_TRAIN_GLOB), key=batch_number)
        wanted = _TRAIN_GLOB
    else:
        files = [path / _VAL_NAME] if (path / _VAL_NAME).is_file() else []
        wanted = _VAL_NAME
    if not files:
        raise DataError(
            f"No {wanted} in {path}; download the official downsampled-ImageNet npz files "
            "there, or pass the path of one .npz file."
        )
    return files


def read_npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the header of an open ``.npy`` stream, left at the data's start."""
    version = np.lib.format.read_magic(f)
    read = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, _, dtype = read(f)
    return shape, dtype


def _headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an ``.npz`` without reading the data."""
    out = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:
                shape, dtype = read_npy_header(f)
            out[info.filename[: -len(".npy")]] = (shape, dtype)
    return out


def check_header(path: Path, img_size: int) -> int:
    """Validate keys, dtypes and shapes of one file; return its number of rows."""
    try:
        heads = _headers(path)
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise DataError(f"{path} is not a readable .npz file ({err}); re-download it.") from err
    missing = [k for k in ("data", "labels") if k not in heads]
    if missing:
        raise DataError(
            f"{path} lacks key(s) {missing} (has {sorted(heads)}); an ImageNet npz file needs "
            "'data' and 'labels'."
        )
    (shape, dtype), (lshape, ldtype) = heads["data"], heads["labels"]
    if len(shape) != 2 or dtype != np.uint8:
        raise DataError(
            f"{path}: 'data' must be a 2-D uint8 array (n, 3*S*S), got shape {shape} of {dtype}."
        )
    cols = shape[1]
    side = math.isqrt(cols // 3)
    if cols % 3 or side * side * 3 != cols:
        raise DataError(f"{path}: 'data' has {cols} columns, which is not 3*S*S for any S.")
    if side != img_size:
        raise DataError(
            f"{path} holds {side}x{side} images ({cols} columns) but img_size={img_size}; set "
            f"img_size={side} or use the {img_size}x{img_size} files."
        )
    if len(lshape) != 1 or lshape[0] != shape[0]:
        raise DataError(
            f"{path}: 'labels' has shape {lshape} but 'data' has {shape[0]} rows; the file is "
            "inconsistent, re-download or re-write it."
        )
    if not np.issubdtype(ldtype, np.integer):
        raise DataError(f"{path}: 'labels' must be integers, got {ldtype}.")
    return shape[0]


def read_npz(path: Path, count: int, img_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The arrays of one file whose header :func:`check_header` accepted.

    Returns:
        images: uint8 (count, 3, S, S).
        labels: int64 (count,), 0-based class ids.
    """
    with np.load(path, allow_pickle=False) as z:
        labels = np.asarray(z["labels"])
        bad = (labels < 1) | (labels > NUM_CLASSES)
        if bad.any():
            zero_based = labels.min() == 0
            hint = " (they look 0-based; the format is 1-based)" if zero_based else ""
            raise DataError(
                f"{path}: {int(bad.sum())} label(s) outside [1, {NUM_CLASSES}], e.g. "
                f"{int(labels[bad][0])}{hint}; write files with write_imagenet_npz."
            )
        # Rows are channel-major, so a plain reshape gives (n, 3, S, S).
        images = z["data"].reshape(count, 3, img_size, img_size)
    return images, labels.astype(np.int64) - 1


class ImageNetNpzDataset(Dataset):
    """Downsampled ImageNet from the official ``.npz`` files, as ``(x, y)`` pairs.

    All images are held in one uint8 array and converted to float per item, so a 64x64 train set
    costs ~15.7 GB of RAM rather than 4x that in float32.

    Attributes:
        images: uint8 numpy array (N, 3, S, S).
        labels: int64 numpy array (N,), 0-based class ids.
        files: the ``.npz`` files read, in order.
        num_classes: 1000.
        img_size: S.
        channels: 3.
        name: ``f"imagenet{S}"``.

    Args:
        path_or_dir: one ``.npz`` file or a directory of the official files.
        img_size: S; must match the files.
        train: pick the train files from a directory, and enable the random flip.
        flip: random horizontal flip in training mode.
    """

    num_classes = NUM_CLASSES
    channels = 3

    def __init__(
        self,
        path_or_dir: str | os.PathLike,
        img_size: int = 64,
        *,
        train: bool = True,
        flip: bool = True,
    ) -> None:
        self.img_size = int(img_size)
        self.name = f"imagenet{self.img_size}"
        self.flip = bool(train and flip)
        self.files = npz_files(path_or_dir, train=train)
        # Headers first, so the full array is allocated once instead of concatenated (2x peak).
        counts = [check_header(f, self.img_size) for f in self.files]
        s = self.img_size
        if sum(counts) * 3 * s * s > LARGE_BYTES:
            warnings.warn(
                f"reading {sum(counts) * 3 * s * s / 1e9:.1f} GB of npz images into this "
                "process's memory (every rank holds its own copy); prepare them once with "
                "`tarflow-prepare` and point data.root at the result to share one copy",
                DataWarning,
                stacklevel=2,
            )
        self.images = np.empty((sum(counts), 3, s, s), dtype=np.uint8)
        self.labels = np.empty(sum(counts), dtype=np.int64)
        start = 0
        for f, n in zip(self.files, counts, strict=True):
            images, labels = read_npz(f, n, s)
            self.images[start : start + n], self.labels[start : start + n] = images, labels
            start += n

    def __len__(self) -> int:
        return len(self.labels)

    def source_id(self, indices=None) -> str:
        """The npz files read, by name, size and modification time (all items come from them)."""
        return "npz:" + files_id(self.files[0].parent, [f.name for f in self.files], self.img_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return item ``index``.

        Returns:
            x: float32 (3, S, S) in [-1, 1], randomly flipped in training mode.
            y: int64 scalar, 0-based class id.
        """
        x = uint8_to_signed(torch.from_numpy(self.images[index]))
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, torch.tensor(int(self.labels[index]), dtype=torch.int64)


def write_imagenet_npz(
    path: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    channels_last: bool | None = None,
    compress: bool = False,
) -> Path:
    """Write images in the official downsampled-ImageNet ``.npz`` format.

    Args:
        path: output file; ``.npz`` is appended if missing.
        images: uint8 (N, S, S, 3) or (N, 3, S, S).
        labels: (N,) 0-based class ids in [0, 999]; stored 1-based as the format requires.
        channels_last: layout of ``images``; ``None`` infers it (ambiguous only when S = 3).
        compress: use ``np.savez_compressed``.

    Returns:
        The path written.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be a 4-D uint8 array, got {images.shape} {images.dtype}")
    if channels_last is None:
        if (images.shape[3] == 3) == (images.shape[1] == 3):
            raise ValueError(
                f"cannot tell the layout of images shaped {images.shape}; pass channels_last"
            )
        channels_last = images.shape[3] == 3
    if channels_last:
        images = images.transpose(0, 3, 1, 2)
    n, c, h, w = images.shape
    if c != 3 or h != w:
        raise ValueError(f"images must be square RGB, got (N, C, H, W) = {images.shape}")
    if labels.shape != (n,) or labels.min(initial=0) < 0 or labels.max(initial=0) >= NUM_CLASSES:
        raise ValueError(f"labels must be (N,) = ({n},) ints in [0, {NUM_CLASSES - 1}]")
    path = Path(path).expanduser()
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    save = np.savez_compressed if compress else np.savez
    save(path, data=np.ascontiguousarray(images).reshape(n, -1), labels=labels.astype(np.int64) + 1)
    return path


def export_to_folder(dataset: ImageNetNpzDataset, root: str | os.PathLike) -> Path:
    """Write a dataset's images as PNGs in class sub-directories.

    Files are ``root/{label:04d}/{index:07d}.png`` (0-based label, dataset index). Read back with
    :class:`~tarflow.data.folder.ImageFolderDataset` the labels match as long as every class
    0..K-1 occurs (true for full ImageNet), since that reader numbers the directories it finds.

    Args:
        dataset: anything with ``images`` uint8 (N, 3, S, S) and ``labels`` (N,) attributes.
        root: output directory (created).

    Returns:
        ``root`` as a Path.
    """
    root = Path(root).expanduser()
    for index, (img, label) in enumerate(zip(dataset.images, dataset.labels, strict=True)):
        out = root / f"{int(label):04d}"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(out / f"{index:07d}.png")
    return root
