"""Fréchet Inception Distance from streamed feature statistics.

Features are never stored: :class:`FeatureStats` keeps the count, the sum and the sum of outer
products in float64, which is all the Gaussian fit needs and lets DDP ranks add their partial
sums. Reference statistics are cached as ``.npz`` files tagged with the settings they were
computed under (dataset, image size, transform, extractor), and loading checks those tags so a
run never silently compares against statistics for different images.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tarflow.files import atomic_write

ArrayLike = np.ndarray | Tensor


def _as_float64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _json_normalize(meta: Mapping[str, Any]) -> dict[str, Any]:
    # A JSON round trip turns tuples into lists etc., so saved and expected values compare equal
    # exactly when they would after reloading.
    return json.loads(json.dumps(dict(meta)))


class FeatureStats:
    """Streaming mean/covariance accumulator for feature vectors.

    The sums live in float64 on the device of the first update, so on GPU the (F, F) outer
    product accumulates there and ``state`` can be all-reduced directly.

    Args:
        meta: Free-form tags saved alongside the statistics (see :meth:`save`).
    """

    def __init__(self, meta: Mapping[str, Any] | None = None) -> None:
        self.count = 0
        self.sum: Tensor | None = None  # (F,)
        self.sum_outer: Tensor | None = None  # (F, F)
        self.meta: dict[str, Any] = dict(meta or {})

    @property
    def num_features(self) -> int | None:
        """Feature dimension F, or None before the first update."""
        return None if self.sum is None else self.sum.shape[0]

    def update(self, features: ArrayLike) -> FeatureStats:
        """Add a batch of features.

        Args:
            features: (B, F) tensor or array.

        Returns:
            self, for chaining.
        """
        feats = torch.as_tensor(features).detach()
        if feats.ndim != 2:
            raise ValueError(f"features must have shape (B, F), got {tuple(feats.shape)}")
        # Sums created under inference_mode would refuse later in-place updates outside it.
        with torch.inference_mode(False), torch.no_grad():
            if self.sum is None:
                dim = feats.shape[1]
                self.sum = torch.zeros(dim, dtype=torch.float64, device=feats.device)
                self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=feats.device)
            elif feats.shape[1] != self.sum.shape[0]:
                raise ValueError(f"expected {self.sum.shape[0]} features, got {feats.shape[1]}")
            feats = feats.to(device=self.sum.device, dtype=torch.float64)
            self.count += feats.shape[0]
            self.sum += feats.sum(dim=0)
            self.sum_outer += feats.T @ feats
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another accumulator's data into this one (in place), e.g. from another rank.

        Returns:
            self, now covering both sets of samples.
        """
        if other.sum is None:
            return self
        with torch.inference_mode(False), torch.no_grad():
            if self.sum is None:
                self.sum = other.sum.clone()
                self.sum_outer = other.sum_outer.clone()
            elif other.sum.shape != self.sum.shape:
                raise ValueError(f"cannot merge {other.sum.shape[0]} into {self.sum.shape[0]} dims")
            else:
                self.sum += other.sum.to(self.sum.device)
                self.sum_outer += other.sum_outer.to(self.sum.device)
        self.count += other.count
        return self

    @property
    def state(self) -> dict[str, Tensor]:
        """Raw sums for cross-process reduction: ``count`` (int64 scalar), ``sum`` (F,),
        ``sum_outer`` (F, F). Sum each entry over ranks, then use :meth:`from_state`."""
        if self.sum is None:
            raise ValueError("FeatureStats is empty")
        count = torch.tensor(self.count, dtype=torch.int64, device=self.sum.device)
        return {"count": count, "sum": self.sum, "sum_outer": self.sum_outer}

    @classmethod
    def from_state(
        cls, state: Mapping[str, Tensor], meta: Mapping[str, Any] | None = None
    ) -> FeatureStats:
        """Rebuild an accumulator from :attr:`state` (possibly summed over ranks)."""
        stats = cls(meta)
        stats.count = int(state["count"])
        stats.sum = torch.as_tensor(state["sum"], dtype=torch.float64).clone()
        stats.sum_outer = torch.as_tensor(state["sum_outer"], dtype=torch.float64).clone()
        return stats

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Sample mean and unbiased covariance (same convention as ``np.cov``).

        Returns:
            mu: (F,) float64. sigma: (F, F) float64, exactly symmetric.
        """
        if self.sum is None or self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.count}")
        n = self.count
        total = self.sum.cpu().numpy()
        mu = total / n
        sigma = (self.sum_outer.cpu().numpy() - np.outer(total, mu)) / (n - 1)
        # Float rounding makes the one-pass estimate slightly asymmetric; sqrt/eig code wants
        # an exactly symmetric matrix.
        return mu, 0.5 * (sigma + sigma.T)

    def save(self, path: str | Path, **meta: Any) -> Path:
        """Write ``mu``, ``sigma``, ``count`` and JSON meta to an ``.npz`` file, atomically.

        Args:
            path: Output file (written as given, no ``.npz`` suffix is appended).
            **meta: Tags merged over ``self.meta``, e.g. dataset, img_size, transform,
                extractor; values must be JSON-serializable.
        """
        path = Path(path)
        mu, sigma = self.mean_cov()
        self.meta = {**self.meta, **meta}
        arrays = {
            "mu": mu,
            "sigma": sigma,
            "count": np.int64(self.count),
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
        }
        atomic_write(path, lambda handle: np.savez(handle, **arrays))
        return path

    @classmethod
    def load(cls, path: str | Path, *, expect: Mapping[str, Any] | None = None) -> FeatureStats:
        """Load statistics written by :meth:`save`.

        Args:
            path: The ``.npz`` file.
            expect: Meta fields this run needs; each must be present with an equal value.

        Raises:
            ValueError: A field in ``expect`` is missing or differs; the message names the file
                and every offending field.
        """
        path = Path(path)
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            count = int(data["count"])
            meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
        problems = []
        for key, want in _json_normalize(expect or {}).items():
            if key not in meta:
                problems.append(f"without {key} (this run uses {key}={want!r})")
            elif meta[key] != want:
                problems.append(f"at {key}={meta[key]!r}, but this run uses {key}={want!r}")
        if problems:
            raise ValueError(f"FID stats in {path} were computed " + "; and ".join(problems))
        # mu/sigma/count determine the raw sums exactly, so a loaded file can be merged further.
        stats = cls(meta)
        stats.count = count
        stats.sum = torch.from_numpy(mu * count)
        stats.sum_outer = torch.from_numpy(sigma * (count - 1) + count * np.outer(mu, mu))
        return stats


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    Uses ``tr sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1)))``: the inner matrix is
    symmetric PSD, so symmetric eigensolvers apply and no complex parts or singular-matrix
    fix-ups arise (``scipy.linalg.sqrtm`` on the non-symmetric product needs both).

    Args:
        mu1: (F,) mean. sigma1: (F, F) covariance. mu2, sigma2: the same for the other set.

    Returns:
        The distance, clamped to >= 0 (rounding can make it slightly negative).
    """
    m1, m2 = _as_float64(mu1), _as_float64(mu2)
    s1, s2 = _as_float64(sigma1), _as_float64(sigma2)
    dim = m1.shape[0]
    if m1.shape != (dim,) or m2.shape != (dim,) or s1.shape != (dim, dim) or s2.shape != s1.shape:
        raise ValueError(
            f"shape mismatch: mu1 {m1.shape}, sigma1 {s1.shape}, mu2 {m2.shape}, sigma2 {s2.shape}"
        )
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    evals, evecs = np.linalg.eigh(s1)
    # Tiny negative eigenvalues are rounding noise of a PSD matrix.
    sqrt_s1 = (evecs * np.sqrt(np.clip(evals, 0.0, None))) @ evecs.T
    inner = sqrt_s1 @ s2 @ sqrt_s1
    inner_evals = np.linalg.eigvalsh(0.5 * (inner + inner.T))
    tr_covmean = np.sqrt(np.clip(inner_evals, 0.0, None)).sum()
    diff = m1 - m2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return float(max(value, 0.0))


def stats_from_batches(
    batches: Iterable[Tensor],
    extractor: Callable[[Tensor], Tensor],
    *,
    progress: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> FeatureStats:
    """Stream image batches through ``extractor`` into a :class:`FeatureStats`.

    Only one batch and its features are alive at a time, so any number of images fits.

    Args:
        batches: Iterable of (B, C, H, W) float images in [-1, 1].
        extractor: Maps a batch to (B, F) features, e.g. :class:`InceptionFeatures`.
        progress: Show a tqdm bar (counts batches).
        meta: Tags stored on the result.

    Returns:
        The accumulated statistics.
    """
    stats = FeatureStats(meta)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="FID features", unit="batch")
    for images in batches:
        with torch.no_grad():
            stats.update(extractor(images))
    return stats


def fid_from_batches(
    batches: Iterable[Tensor],
    reference: FeatureStats | tuple[ArrayLike, ArrayLike],
    extractor: Callable[[Tensor], Tensor],
    *,
    progress: bool = False,
) -> float:
    """FID between streamed images and reference statistics.

    Args:
        batches: Iterable of (B, C, H, W) float images in [-1, 1].
        reference: Reference :class:`FeatureStats` or a ``(mu (F,), sigma (F, F))`` pair.
        extractor: Same feature extractor the reference was computed with.
        progress: Show a tqdm bar.
    """
    ref_mu, ref_sigma = reference.mean_cov() if isinstance(reference, FeatureStats) else reference
    mu, sigma = stats_from_batches(batches, extractor, progress=progress).mean_cov()
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)
