"""The sources of a preparation (:mod:`tarflow.data.prepare`): official npz files or an image
folder, checked and fingerprinted before anything is written, and read part by part.

Fingerprints (name, size and a hash of the first and last MiB of each npz file; the sorted
listing with sizes of an image folder) are cheap to recompute and survive a copy of the sources,
unlike modification times.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tarflow.data.errors import DataError
from tarflow.data.folder import _DECODE_ERRORS, ImageFolderDataset
from tarflow.data.imagenet_npz import check_header, npz_files, read_npz
from tarflow.data.prepared import looks_prepared
from tarflow.data.registry import PREPARABLE, build_dataset

__all__ = ["check_sources"]

_SAMPLE = 1 << 20  # bytes hashed at each end of an npz file


def _file_print(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_SAMPLE))
        f.seek(max(0, size - _SAMPLE))
        h.update(f.read(_SAMPLE))
    return {"name": path.name, "size": size, "sample_sha256": h.hexdigest()}


class _NpzSource:
    """Official npz files of one split; part k is file k."""

    def __init__(self, files: list[Path], img_size: int) -> None:
        self.root, self.files, self.img_size = files[0].parent, files, img_size
        self.parts = [check_header(f, img_size) for f in files]
        self.fingerprint = {"kind": "npz", "files": [_file_print(f) for f in files]}

    def read(self, k: int, start: int, workers: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        images, labels = read_npz(self.files[k], self.parts[k], self.img_size)
        return images, labels, []


class _Cropped(Dataset):
    """Folder images ``start ..`` as uint8 (C, S, S) tensors, for DataLoader workers."""

    def __init__(self, folder: ImageFolderDataset, start: int, count: int) -> None:
        self.folder, self.start, self.count = folder, start, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        img, label, read = self.folder.image(self.start + i)
        a = np.array(img)  # (S, S) for "L", (S, S, C) for "RGB"; a writable copy
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # -> (C, S, S)
        return torch.from_numpy(np.ascontiguousarray(a)), label, read


class _FolderSource:
    """An image folder split; part k is images ``[k * chunk, (k + 1) * chunk)``."""

    def __init__(self, folder: ImageFolderDataset, chunk: int) -> None:
        self.folder, self.root = folder, folder.root
        n = len(folder)
        self.parts = [min(chunk, n - s) for s in range(0, n, chunk)]
        listing = hashlib.sha256()
        total = 0
        for i in range(n):
            path = folder.path(i)
            size = path.stat().st_size
            total += size
            listing.update(f"{path.relative_to(folder.root)}\0{size}\n".encode("utf-8", "replace"))
        self.fingerprint = {
            "kind": "folder",
            "classes": folder.class_names,
            "files": n,
            "bytes": total,
            "listing_sha256": listing.hexdigest(),
        }

    def read(self, k: int, start: int, workers: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        loader = DataLoader(
            _Cropped(self.folder, start, self.parts[k]), batch_size=64, num_workers=workers
        )
        images, labels, substituted = [], [], []
        at = start
        for x, y, read in loader:
            images.append(x.numpy())
            labels.append(y.numpy())
            wanted = torch.arange(at, at + len(x))
            # An unreadable image was replaced by the next readable one, as the reader does.
            substituted += [str(self.folder.path(int(i))) for i in wanted[read != wanted]]
            at += len(x)
        return np.concatenate(images), np.concatenate(labels).astype(np.int64), substituted


def check_sources(name, root: Path, img_size, channels, splits, chunk) -> dict[str, Any]:
    """Check the sources of every split (nothing is written yet)."""
    if name not in PREPARABLE:
        raise DataError(f"tarflow-prepare reads {sorted(PREPARABLE)}, not {name!r}")
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise FileNotFoundError(f"source directory {root} {what}")
    if looks_prepared(root):
        raise DataError(f"{root} is already a prepared set; pass the original files' directory")
    npz = name == "imagenet64" and any(root.glob("*.npz"))
    if splits is None:
        if npz:
            splits = [
                s
                for s, glob in (("train", "train_data_batch_*.npz"), ("val", "val_data.npz"))
                if any(root.glob(glob))
            ] or ["train"]
        else:
            splits = [s for s in ("train", "val") if (root / s).is_dir()] or ["train"]
    out = {}
    for split in splits:
        if split not in ("train", "val"):
            raise DataError(f"splits are 'train' and 'val', not {split!r}")
        if npz:
            if channels != 3:
                raise DataError(f"ImageNet npz files are RGB; use --channels 3 (got {channels})")
            out[split] = _NpzSource(npz_files(root, train=split == "train"), img_size)
        else:
            folder = build_dataset(
                name, root=root, img_size=img_size, split=split, channels=channels, flip=False
            )
            _check_side(folder, img_size)
            out[split] = _FolderSource(folder, chunk)
    return out


def _check_side(folder: ImageFolderDataset, img_size: int, samples: int = 64) -> None:
    """Refuse a side no image of the folder reaches (the resize would only enlarge them all),
    judged from the headers of up to ``samples`` images spread over the folder."""
    n = len(folder)
    picks = sorted({round(i * (n - 1) / max(1, samples - 1)) for i in range(min(n, samples))})
    largest = 0
    for i in picks:
        try:
            with Image.open(folder.path(i)) as img:
                largest = max(largest, min(img.size))
        except _DECODE_ERRORS:
            continue  # unreadable: the copy replaces it by a neighbour, as the reader does
    if 0 < largest < img_size:
        raise DataError(
            f"--img-size {img_size} is more than the images of {folder.root} can give (the "
            f"largest short side among {len(picks)} of them is {largest} px; resizing would "
            f"only enlarge them): use --img-size {largest} or less"
        )
