"""Synthetic images for tests and config smoke runs in place of ImageNet / AFHQ."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["FakeImageDataset"]


class FakeImageDataset(Dataset):
    """Deterministic smooth random images, as ``(x, y)`` pairs.

    Item ``i`` is built from its own seed (derived from ``seed`` and ``i``), so it is the same on
    every access, in any order, in any worker. Each image is low-resolution Gaussian noise
    upsampled bilinearly (so neighbouring pixels correlate, like a real image) plus a per-class
    brightness offset (so a class-conditional model has something to learn), squashed into
    (-1, 1) with tanh.

    Attributes:
        num_classes: as given (0 = unconditional, every label 0).
        img_size: S.
        channels: C.
        name: ``"fake"``.

    Args:
        length: number of items N.
        img_size: side S.
        channels: C.
        num_classes: labels are ``index % num_classes`` (0 if unconditional).
        seed: changes every image.
    """

    name = "fake"

    def __init__(
        self,
        length: int = 64,
        img_size: int = 16,
        channels: int = 3,
        num_classes: int = 0,
        seed: int = 0,
    ) -> None:
        if length < 0 or img_size < 1 or channels < 1 or num_classes < 0:
            raise ValueError(
                f"invalid FakeImageDataset(length={length}, img_size={img_size}, "
                f"channels={channels}, num_classes={num_classes})"
            )
        self.length = int(length)
        self.img_size = int(img_size)
        self.channels = int(channels)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        # Coarse grid the noise is drawn on: 1/4 of the side, but at least 2x2.
        self._coarse = max(2, self.img_size // 4)

    def __len__(self) -> int:
        return self.length

    def label(self, index: int) -> int:
        """Label of item ``index``: ``index % num_classes``, or 0 if unconditional."""
        return index % self.num_classes if self.num_classes else 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return item ``index``.

        Returns:
            x: float32 (C, S, S) in (-1, 1).
            y: int64 scalar label.
        """
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for FakeImageDataset({self.length})")
        index %= self.length
        # A large odd multiplier keeps (seed, index) pairs from colliding for realistic sizes.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        c = self._coarse
        noise = torch.randn((1, self.channels, c, c), generator=gen)
        x = F.interpolate(
            noise, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False
        )[0]
        y = self.label(index)
        if self.num_classes > 1:
            x = x + (2.0 * y / (self.num_classes - 1) - 1.0)
        return torch.tanh(x), torch.tensor(y, dtype=torch.int64)
