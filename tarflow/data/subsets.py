"""Fixed subsets of a dataset: the same images on every run, rank and entry point.

A subset is the first ``count`` indices of a permutation seeded by ``seed``, so class-sorted
datasets still give a class-balanced subset. The CRM/IGM probe batch and the FID reference
statistics both read their images this way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset


def fixed_subset(dataset: Dataset, count: int, seed: int = 0) -> list[int]:
    """The first ``min(count, len(dataset))`` indices of a ``seed``-fixed permutation."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(len(dataset), generator=gen)[: max(0, int(count))].tolist()


def stack_items(dataset: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (M, C, H, W) and labels (M,) int64 of the given dataset items."""
    items = [dataset[i] for i in indices]
    images = torch.stack([torch.as_tensor(x) for x, _ in items])
    labels = torch.stack([torch.as_tensor(y, dtype=torch.long) for _, y in items])
    return images, labels


def image_batches(dataset: Dataset, indices: Sequence[int], batch_size: int,
                  device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """(B, C, H, W) image batches of the given dataset items, moved to ``device``."""
    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        yield stack_items(dataset, indices[start:start + batch_size])[0].to(device)
