"""A tiny real dataset that needs no download: scikit-learn's 8x8 handwritten digits.

The 1,797 images ship inside the scikit-learn wheel, so this set works offline and in CI. It is
small enough to precompute completely at construction.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["DigitsDataset"]

_SPLITS = ("train", "val", "all")


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Raw digits: images (1797, 8, 8) with values 0..16, targets (1797,) in 0..9.

    Cached (sklearn parses a CSV each call) and read-only, since every caller shares it.
    """
    try:
        from sklearn.datasets import load_digits  # lazy: only the demo set needs sklearn
    except ImportError as err:
        raise ImportError(
            "The 'demo' dataset (8x8 digits) needs scikit-learn: pip install scikit-learn "
            "(or tarflow[dev])."
        ) from err
    digits = load_digits()
    for array in (digits.images, digits.target):
        array.setflags(write=False)
    return digits.images, digits.target


def _split_indices(targets: np.ndarray, split: str, val_fraction: float, seed: int) -> np.ndarray:
    """Indices of ``split``; stratified by class and fixed by ``seed``, so val never changes."""
    if split == "all":
        return np.arange(len(targets))
    from sklearn.model_selection import train_test_split

    train_idx, val_idx = train_test_split(
        np.arange(len(targets)), test_size=val_fraction, random_state=seed, stratify=targets
    )
    # Sorted so item order does not depend on the shuffle either.
    return np.sort(val_idx if split == "val" else train_idx)


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits, upsampled, as ``(x, y)`` pairs.

    Pixel values 0..16 are scaled to [0, 1], upsampled from 8x8 to ``img_size`` with bilinear
    interpolation (``align_corners=False``, no antialiasing) and mapped to [-1, 1]. There is no
    horizontal flip: a mirrored digit is not a digit.

    Attributes:
        images: float32 tensor (N, channels, S, S) in [-1, 1].
        labels: int64 tensor (N,) in 0..9.
        indices: int64 numpy array (N,), positions in the full 1,797-image set.
        num_classes: 10.
        img_size: S.
        channels: 1 (or 3 if asked for, with the gray plane repeated).
        name: ``"demo"``.

    Args:
        img_size: output side S.
        split: ``"train"``, ``"val"`` or ``"all"``.
        val_fraction: share of images held out for val (stratified by class).
        seed: fixes the split.
        channels: 1, or 3 to repeat the gray plane for an RGB model.
    """

    num_classes = 10
    name = "demo"

    def __init__(
        self,
        img_size: int = 16,
        *,
        split: str = "train",
        val_fraction: float = 0.1,
        seed: int = 0,
        channels: int = 1,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"digits split must be one of {_SPLITS}, got {split!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.img_size = int(img_size)
        self.channels = channels
        self.split = split
        raw, targets = _load_digits()
        self.indices = _split_indices(targets, split, val_fraction, seed)
        x = torch.from_numpy(raw[self.indices]).to(torch.float32).div(16.0).unsqueeze(1)
        x = F.interpolate(
            x,
            size=(self.img_size, self.img_size),
            mode="bilinear",
            align_corners=False,
            antialias=False,
        )
        # Bilinear weights are convex, so this clamp only removes float rounding.
        x = (x * 2 - 1).clamp_(-1, 1)
        self.images = x.expand(-1, channels, -1, -1).contiguous()
        self.labels = torch.from_numpy(targets[self.indices]).to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return item ``index``.

        Returns:
            x: float32 (channels, S, S) in [-1, 1].
            y: int64 scalar in 0..9.
        """
        # Cloned so in-place edits by the caller cannot corrupt the cached set.
        return self.images[index].clone(), self.labels[index].clone()
