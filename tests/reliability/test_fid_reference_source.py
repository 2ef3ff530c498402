"""FID reference statistics belong to the images they were computed from: another folder or
prepared set under the same dataset name, size, channels, split and count is not scored against
the first one's cached statistics (issue 30, item 1)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tarflow.data import build_dataset, prepare_dataset
from tarflow.eval import FeatureStats
from tarflow.eval.fid_reference import reference_provenance, reference_stats, stats_file_name
from tarflow.eval.references import ReferenceStats


class MeanColour:
    """Features: per-channel means and the first pixels; counts the images it sees."""

    name = "mean-colour"

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return torch.cat([x.mean(dim=(2, 3)), x.flatten(1)[:, :5]], dim=1).double()


def _folder(root: Path, seed: int) -> Path:
    """root/train/{a,b}/*.png: 4 noise images per class, 8x8 RGB (noise does not compress, so
    two folders hold files of the same names and sizes)."""
    rng = np.random.default_rng(seed)
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / cls / f"{i}.png")
    return root


def _stats(path: Path, root: Path, extractor: MeanColour) -> ReferenceStats:
    ds = build_dataset("imagenet64", root=root, img_size=8, split="train", flip=False)
    return reference_stats(path, ds, extractor, split="train", count=6, batch_size=4)


def _fresh(root: Path, tmp: Path) -> ReferenceStats:
    return _stats(tmp / f"fresh_{root.name}.npz", root, MeanColour())


def _same(a: ReferenceStats, b: ReferenceStats) -> bool:
    """Equal moments (a cache read back re-derives them from its sums: float round-off)."""
    return np.allclose(a.mu, b.mu, rtol=1e-9, atol=1e-12) and np.allclose(
        a.sigma, b.sigma, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["folder", "prepared"])
def test_another_source_under_the_same_key_gets_its_own_statistics(tmp_path, kind):
    first, second = _folder(tmp_path / "v1", seed=1), _folder(tmp_path / "v2", seed=2)
    names = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert [(first / n).stat().st_size for n in names] == [(second / n).stat().st_size
                                                            for n in names]
    if kind == "prepared":
        first = prepare_dataset("imagenet64", first, tmp_path / "p1", img_size=8)[0] and (
            tmp_path / "p1")
        second = prepare_dataset("imagenet64", second, tmp_path / "p2", img_size=8)[0] and (
            tmp_path / "p2")
    cache = tmp_path / "cache" / stats_file_name("imagenet64", 8, 3, "train", 6)
    extractor = MeanColour()
    a = _stats(cache, first, extractor)
    assert extractor.seen == 6 and _same(a, _fresh(first, tmp_path))
    # The same source again reads the cache.
    assert _same(_stats(cache, first, extractor), a) and extractor.seen == 6
    with pytest.warns(UserWarning, match="recomputing FID reference stats.*source"):
        b = _stats(cache, second, extractor)
    assert extractor.seen == 12, "the second source's images were never read"
    assert _same(b, _fresh(second, tmp_path)) and not _same(a, b)
    assert reference_provenance(b)["source"] == FeatureStats.load(cache).meta["source"]


def test_an_edited_folder_is_a_new_source(tmp_path):
    root = _folder(tmp_path / "v1", seed=1)
    cache = tmp_path / stats_file_name("imagenet64", 8, 3, "train", 6)
    extractor = MeanColour()
    a = _stats(cache, root, extractor)
    # Every image replaced by another of the same size and name (a re-download, a filter).
    other = _folder(tmp_path / "v2", seed=2)
    for png in other.rglob("*.png"):
        target = root / png.relative_to(other)
        shutil.copyfile(png, target)
        os.utime(target, ns=(1, target.stat().st_mtime_ns + 10**9))
    with pytest.warns(UserWarning, match="recomputing"):
        b = _stats(cache, root, extractor)
    assert extractor.seen == 12 and not _same(a, b) and _same(b, _fresh(other, tmp_path))
