"""FID reference statistics of real images, cached with the settings they were computed under.

The statistics use a fixed subset of a dataset (:func:`tarflow.data.subsets.fixed_subset`), so
every run, the ``tarflow-eval`` command and ``scripts/prepare_fid_stats.py`` pick the same images.
The cache carries its settings (:func:`reference_meta`), including the identity of the files
the images come from; a cache computed for other images (another folder or prepared set under
the same name, size, split and count) is recomputed instead of being compared against.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from tarflow.data.subsets import fixed_subset, image_batches, source_id
from tarflow.eval.fid import FeatureStats
from tarflow.eval.references import ReferenceStats, load_or_compute_reference, reference_format


def describe_dataset(dataset: Dataset) -> dict[str, Any]:
    """Name, image size and channels of a dataset (from its attributes or its first image)."""
    x = torch.as_tensor(dataset[0][0])
    return {
        "dataset": str(getattr(dataset, "name", type(dataset).__name__)),
        "img_size": int(getattr(dataset, "img_size", x.shape[-1])),
        "channels": int(getattr(dataset, "channels", x.shape[0])),
    }


def reference_meta(dataset: Dataset, *, split: str, count: int, seed: int,
                   indices: Sequence[int] | None = None) -> dict[str, Any]:
    """What determines a reference-statistics file: the images and how they were chosen.

    With ``indices`` (the subset read), ``source`` also names the files they come from
    (:func:`tarflow.data.subsets.source_id`): another folder or prepared set with the same
    name, size, split and count gives other statistics, so its cache is recomputed."""
    meta = {**describe_dataset(dataset), "split": str(split), "count": int(count),
            "subset_seed": int(seed)}
    source = None if indices is None else source_id(dataset, indices)
    return meta if source is None else {**meta, "source": source}


def stats_file_name(dataset: str, img_size: int, channels: int, split: str, count: int) -> str:
    """The cache file name every entry point uses, e.g. ``demo_16px_c1_train300.npz``.

    ``tarflow/conf/callbacks/sampling.yaml`` and ``tarflow/conf/eval.yaml`` spell the same pattern
    with interpolations, so the callback, ``tarflow-eval`` and ``scripts/prepare_fid_stats.py``
    share one cache (:func:`reference_path` renames it when fewer images exist than asked).
    """
    return f"{dataset}_{int(img_size)}px_c{int(channels)}_{split}{int(count)}.npz"


# Fewer real images than this cannot give a covariance: refused. Between this and the count asked
# for, the statistics are computed from what exists, named by it, with a warning.
MIN_REFERENCE_IMAGES = 2


def reference_path(path: str | Path, dataset: Dataset, *, split: str, count: int,
                   quiet: bool = False) -> tuple[Path, int]:
    """Where the statistics of ``count`` images of ``dataset`` are cached, and how many images
    they hold.

    When the dataset has fewer than ``count`` images, our cache's standard name (ending in
    ``_<split><count>.npz``, :func:`stats_file_name`) is renamed for the images it will hold
    (``..._train48.npz``, not ``..._train300.npz`` holding 48), with a warning; other paths
    (external references, names of the user's own) are kept as given.

    Raises:
        ValueError: fewer than :data:`MIN_REFERENCE_IMAGES` images exist.
    """
    path, held = Path(path), min(int(count), len(dataset))
    if held >= int(count):
        return path, held
    if held < MIN_REFERENCE_IMAGES:
        raise ValueError(f"FID reference: the {split} split holds {held} image(s); the "
                         f"statistics need at least {MIN_REFERENCE_IMAGES}")
    asked = re.fullmatch(rf"(.*_{re.escape(str(split))}){int(count)}\.npz", path.name)
    if asked and reference_format(path) in (None, "tarflow-npz"):
        path = path.with_name(f"{asked.group(1)}{held}.npz")
    if not quiet:
        warnings.warn(f"FID reference: {count} {split} images asked for, but the dataset holds "
                      f"only {held}; the statistics ({path.name}) are of those {held}, and FID "
                      f"against few images is biased upward", UserWarning, stacklevel=2)
    return path, held


def reference_stats(path: str | Path, dataset: Dataset, extractor: Callable, *, split: str,
                    count: int, seed: int = 0, batch_size: int = 64,
                    device: torch.device | str = "cpu", progress: bool = False) -> ReferenceStats:
    """Load the reference statistics from ``path``, computing and caching them when needed.

    ``path`` may also hold an external reference (the official torchmetrics FID ``.pth``, a
    plain ``mu``/``sigma`` ``.npz``): it is used as it is, and the dataset is not read.

    Args:
        path: cache file (``.npz``) or external reference.
        dataset: the real images (items ``(x (C, H, W) in [-1, 1], y)``).
        extractor: feature network, images (B, C, H, W) -> (B, F).
        split: the dataset's split name (recorded in the cache's meta).
        count: images to use (fewer if the dataset is smaller).
        seed: seed of the subset permutation.
        batch_size: images per extractor call.
        device: where the images go before the extractor sees them.
        progress: show a progress bar while computing.

    Returns:
        The moments with their sample count and provenance (``meta["format"]``, ``path``).
    """
    if reference_format(path) in (None, "tarflow-npz"):  # an external reference: as it is
        path, _ = reference_path(path, dataset, split=split, count=count)
    indices = fixed_subset(dataset, count, seed)
    meta = reference_meta(dataset, split=split, count=len(indices), seed=seed, indices=indices)
    stats = load_or_compute_reference(
        path, lambda: image_batches(dataset, indices, batch_size, device), extractor, meta,
        progress=progress)
    if isinstance(stats, FeatureStats):
        stats = ReferenceStats.from_feature_stats(stats, format="tarflow-npz",
                                                  path=str(Path(path).resolve()))
    return stats


def reference_provenance(reference: ReferenceStats) -> dict[str, Any]:
    """The reference's format, file, sample count and checksum (plus our cache's own tags),
    as plain values for logs, hyper-parameters and ``eval.json``."""
    keep = ("format", "path", "num_samples", "sha256", "img_size", "dataset", "split",
            "extractor", "subset_seed", "source")
    return {k: reference.meta[k] for k in keep if k in reference.meta}
