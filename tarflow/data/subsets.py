"""Fixed subsets of a dataset: the same images on every run, rank and entry point.

A subset is the first ``count`` indices of a permutation seeded by ``seed``, so class-sorted
datasets still give a class-balanced subset. The CRM/IGM probe batch and the FID reference
statistics both read their images this way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

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


def files_id(root: Path, names: Iterable[str], *extra: Any) -> str:
    """A short hash of files under ``root`` by relative name, size and modification time (plus
    ``extra`` JSON-able facts): cheap to compute, and it changes when any file is replaced,
    edited, added or removed. A file that cannot be read counts as size -1."""
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for name in names:
        try:
            st = (root / name).stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, 0
        digest.update(f"{name}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


def source_id(dataset: Dataset, indices: Sequence[int]) -> str | None:
    """What the items ``indices`` of ``dataset`` are read from, as a short hash (the dataset's
    own ``source_id``): a prepared split's source fingerprint, a folder's files, an npz reader's
    files. None for generated data, which its name and settings already fix."""
    identify = getattr(dataset, "source_id", None)
    return identify(indices) if callable(identify) else None
