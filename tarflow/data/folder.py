"""Image-folder datasets: class sub-directories (or one flat directory) of image files.

Unreadable files are found lazily in ``__getitem__`` rather than by verifying every file at
start-up (ImageNet has 1.28 M of them): each one is reported once, replaced by a deterministic
neighbour, and counted; too many raise :class:`DataError`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from tarflow.data.errors import DataError, DataWarning
from tarflow.data.subsets import files_id
from tarflow.data.transforms import image_transform, resize_crop

__all__ = ["AFHQ_CLASSES", "IMG_EXTENSIONS", "ImageFolderDataset", "afhq_dataset"]

# Matched case-insensitively, so ".JPEG" (ImageNet) and ".PNG" are covered.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
AFHQ_CLASSES = ("cat", "dog", "wild")

# What PIL raises for a corrupt, truncated or unsupported file. SyntaxError comes from some
# plugins (e.g. a broken PNG chunk); DecompressionBombError is not an OSError.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _images_under(directory: Path, recursive: bool) -> list[str]:
    """Image paths under ``directory`` relative to it, in sorted (deterministic) order."""
    if not recursive:
        return sorted(e.name for e in os.scandir(directory) if e.is_file() and _is_image(e.name))
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, directory)
        found += [os.path.normpath(os.path.join(rel, f)) for f in sorted(filenames) if _is_image(f)]
    return found


class _PathTable:
    """Relative paths packed into one bytes buffer plus offsets.

    A Python list of a million ``str`` objects is touched (refcounts) by every DataLoader worker
    and so gets copied into each forked process; two numpy arrays are not.
    """

    def __init__(self, paths: list[str]) -> None:
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i > 0 else 0
        return self._blob[start : int(self._ends[i])].tobytes().decode("utf-8", "surrogateescape")


class ImageFolderDataset(Dataset):
    """Images from a directory tree, as ``(x, y)`` pairs.

    Layouts:
        * ``root/<class>/**/<image>``: one label per class sub-directory, numbered in sorted
          order of the directory names, or in the order of ``class_names`` if given.
        * ``root/<image>``: a flat directory, unconditional (``num_classes = 0``, label 0).

    Attributes:
        root: the directory read.
        img_size: output side S.
        channels: 1 or 3.
        num_classes: number of classes (0 for a flat directory).
        class_names: class directory names, index = label (empty for a flat directory).
        labels: int64 numpy array (N,) of labels.
        bad_files: paths found unreadable so far, in discovery order. Each DataLoader worker
            holds its own copy, so counts (and warnings) are per process.
        bad_limit: how many unreadable files are tolerated before :class:`DataError`.
        name: dataset name used in logs.

    Args:
        root: dataset directory.
        img_size: output side S; images are resized (short side) and centre-cropped to it.
        channels: 1 or 3; every image is converted to that many channels.
        train: training mode (enables the random flip if ``flip``).
        flip: random horizontal flip in training mode.
        class_names: explicit class sub-directories, e.g. ``["cat", "dog", "wild"]``.
        max_bad_fraction: tolerated fraction of unreadable files...
        max_bad: ...or this many, whichever is larger, before raising :class:`DataError`.
        name: dataset name used in logs.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        img_size: int,
        *,
        channels: int = 3,
        train: bool = True,
        flip: bool = True,
        class_names: list[str] | None = None,
        max_bad_fraction: float = 0.01,
        max_bad: int = 10,
        name: str = "folder",
    ) -> None:
        self.root = Path(root).expanduser()
        self.img_size = int(img_size)
        self.channels = int(channels)
        self.name = name
        self.transform = image_transform(self.img_size, train=train, flip=flip, channels=channels)
        self._convert = self.transform.transforms[0]
        self._after_convert = T.Compose(self.transform.transforms[1:])
        # The same resize/crop the transform starts with (its ConvertMode is then a no-op).
        self._crop = resize_crop(self.img_size, channels=self.channels)
        if not self.root.is_dir():
            what = "is not a directory" if self.root.exists() else "does not exist"
            raise FileNotFoundError(
                f"Image directory {self.root} {what}; check the dataset root path."
            )
        paths, labels, self.class_names = self._scan(class_names)
        self._paths = _PathTable(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = len(self.class_names)
        self.class_to_idx = {c: i for i, c in enumerate(self.class_names)}
        self.bad_limit = max(int(max_bad), int(max_bad_fraction * len(paths)))
        self.bad_files: list[str] = []
        self._bad_indices: set[int] = set()

    def _scan(self, class_names: list[str] | None) -> tuple[list[str], list[int], list[str]]:
        exts = "/".join(IMG_EXTENSIONS)
        if class_names is None:
            subdirs = sorted(
                e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(".")
            )
            if not subdirs:  # flat directory: unconditional
                paths = _images_under(self.root, recursive=False)
                if not paths:
                    raise DataError(
                        f"No images ({exts}, any case) found in {self.root}; point the dataset "
                        "root at a directory of images or of class sub-directories."
                    )
                return paths, [0] * len(paths), []
            loose = _images_under(self.root, recursive=False)
            if loose:
                warnings.warn(
                    f"{self.root} has class sub-directories, so its {len(loose)} top-level "
                    f"image(s) (e.g. {loose[0]}) are ignored.",
                    DataWarning,
                    stacklevel=3,
                )
            class_names = subdirs
        missing = [c for c in class_names if not (self.root / c).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"Class directory {self.root / missing[0]} does not exist (missing: {missing}); "
                f"expected sub-directories {list(class_names)} under {self.root}."
            )
        paths, labels = [], []
        for label, cls in enumerate(class_names):
            cdir = self.root / cls
            found = _images_under(cdir, recursive=True)
            if not found:
                # An empty class would silently renumber every later class, so refuse it.
                raise DataError(
                    f"No images ({exts}, any case) found in class directory {cdir}; add its "
                    "images or remove the directory."
                )
            paths += [os.path.join(cls, p) for p in found]
            labels += [label] * len(found)
        return paths, labels, list(class_names)

    def __len__(self) -> int:
        return len(self._paths)

    def source_id(self, indices: Sequence[int] | None = None) -> str:
        """The files of items ``indices`` (all by default) by name, size and modification time,
        with the class names: two folders, or one folder edited, give two ids."""
        n = len(self)
        picks = range(n) if indices is None else sorted({int(i) % n for i in indices})
        return "folder:" + files_id(self.root, (self._paths[i] for i in picks), self.class_names)

    def path(self, index: int) -> Path:
        """Absolute path of item ``index`` (after negative-index wrapping)."""
        return self.root / self._paths[index % len(self)]

    def _load(self, index: int) -> Image.Image:
        with Image.open(self.root / self._paths[index]) as img:
            img.load()  # Image.open is lazy; force decoding so truncation shows up here
            # Leaving the `with` closes only the file, so returning `img` itself is safe.
            return self._convert(img)

    def _mark_bad(self, index: int, err: BaseException) -> None:
        path = str(self.path(index))
        self._bad_indices.add(index)
        self.bad_files.append(path)
        if len(self.bad_files) > self.bad_limit:
            raise DataError(
                f"{len(self.bad_files)} unreadable images in {self.root} (tolerated: "
                f"{self.bad_limit}); the last was {path} ({type(err).__name__}: {err}). Re-extract "
                "or clean the dataset, or raise max_bad / max_bad_fraction."
            ) from err
        warnings.warn(
            f"Unreadable image {path} ({type(err).__name__}: {err}); substituting another "
            f"image ({len(self.bad_files)} bad so far, {self.bad_limit} tolerated).",
            DataWarning,
            stacklevel=3,
        )

    def _readable(self, index: int) -> tuple[int, Image.Image]:
        """The first readable image at or after ``index`` (mode-converted) and its index."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images in {self.root}")
        index %= n
        # Walk forward to the next readable image: deterministic, and usually the same class.
        for step in range(n):
            j = (index + step) % n
            if j in self._bad_indices:
                continue
            try:
                return j, self._load(j)
            except _DECODE_ERRORS as err:
                self._mark_bad(j, err)
        raise DataError(f"No readable image left in {self.root}.")

    def image(self, index: int) -> tuple[Image.Image, int, int]:
        """Item ``index`` at the training size before the tensor steps (no flip).

        Returns:
            img: PIL image, S x S, in the dataset's mode ("L" or "RGB").
            label: its label.
            read: the index actually read (a later one when ``index`` is unreadable).
        """
        j, img = self._readable(index)
        return self._crop(img), int(self.labels[j]), j

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return item ``index``.

        Returns:
            x: float32 (channels, S, S) in [-1, 1].
            y: int64 scalar label.
        """
        j, img = self._readable(index)
        # Mode conversion already ran inside _load's error handling; finish outside it so a
        # bug in the pipeline is not mistaken for a bad file.
        x = self._after_convert(img)
        return x, torch.tensor(int(self.labels[j]), dtype=torch.int64)


def afhq_dataset(
    root: str | os.PathLike, img_size: int, split: str = "train", **kwargs
) -> ImageFolderDataset:
    """AFHQ laid out as ``root/{train,val}/{cat,dog,wild}``: labels cat=0, dog=1, wild=2.

    Args:
        root: AFHQ root directory (the one holding ``train/`` and ``val/``).
        img_size: output side S.
        split: ``"train"`` or ``"val"``; val disables the random flip.
        **kwargs: forwarded to :class:`ImageFolderDataset` (``channels``, ``flip``, ...).
    """
    if split not in ("train", "val"):
        raise ValueError(f"AFHQ split must be 'train' or 'val', got {split!r}")
    split_dir = Path(root).expanduser() / split
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"AFHQ split directory {split_dir} does not exist; expected the layout "
            f"root/{{train,val}}/{{{','.join(AFHQ_CLASSES)}}} with root={root}."
        )
    kwargs.setdefault("name", "afhq")
    return ImageFolderDataset(
        split_dir, img_size, train=split == "train", class_names=list(AFHQ_CLASSES), **kwargs
    )
