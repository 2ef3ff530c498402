"""FID reference statistics from files other than our own cache: what each format holds.

Three formats are read, each with ``weights_only=True`` / ``allow_pickle=False``:

* ``tarflow-npz``: our cache (:meth:`FeatureStats.save`): ``mu``, ``sigma``, ``count`` and the
  JSON ``meta`` saying which images and extractor produced it. Stale caches are recomputed.
* ``torchmetrics-fid``: the state dict of a torchmetrics ``FrechetInceptionDistance``, as the
  TarFlow authors' ``prepare_fid_stats.py`` writes it and the GS-Jacobi authors publish it beside
  their checkpoints (``{dataset}_{img_size}_fid_stats.pth``): the buffers
  ``real_features_sum`` (F,), ``real_features_cov_sum`` (F, F) (sum of outer products) and
  ``real_features_num_samples``, i.e. the same sums :class:`FeatureStats` keeps, over the same
  torch-fidelity Inception features (2048-d pool3, uint8 input) we use. Other entries (the
  Inception weights, the ``fake_*`` buffers) are ignored.
* ``mu-sigma-npz``: a plain ``.npz`` with ``mu`` (F,) and ``sigma`` (F, F) (pytorch-fid, ADM,
  ...), with ``count`` / ``n`` if the file has one.

The last two are external references: used as they are and never overwritten. Their sample
count and provenance (format, path, SHA-256) travel with them in :class:`ReferenceStats`.
:func:`load_or_compute_reference` reads any of the three, and computes and caches the first.
"""

from __future__ import annotations

import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tarflow.eval.fid import FeatureStats, stats_from_batches
from tarflow.eval.inception import file_sha256 as _sha256

TORCHMETRICS_KEYS = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
# The official statistics are named {dataset}_{img_size}_fid_stats.pth: the only place their
# resolution is written down.
_OFFICIAL_NAME = re.compile(r"_(\d+)_fid_stats\.pth$")
FORMATS = ("tarflow-npz", "torchmetrics-fid", "mu-sigma-npz")


@dataclass
class ReferenceStats:
    """Reference moments and where they came from.

    Attributes:
        mu: (F,) float64 feature mean.
        sigma: (F, F) float64 covariance.
        count: images behind the moments, or None when the file does not say.
        meta: provenance: ``format``, ``path``, ``sha256``, ``num_samples`` and, for our cache,
            its own tags (dataset, split, extractor, ...); ``img_size`` for official names.
    """

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def external(self) -> bool:
        """Not our cache: used as given, never recomputed or overwritten."""
        return self.meta.get("format") != "tarflow-npz"

    @property
    def num_features(self) -> int:
        return int(self.mu.shape[0])

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (F,), sigma (F, F)), as :meth:`FeatureStats.mean_cov`."""
        return self.mu, self.sigma

    def describe(self) -> str:
        """One line for logs: format, sample count and file."""
        n = "unknown" if self.count is None else str(self.count)
        return f"{self.meta.get('format')} ({n} images, {self.num_features} features) " \
               f"from {self.meta.get('path')}"

    @classmethod
    def from_feature_stats(cls, stats: FeatureStats, **meta: Any) -> ReferenceStats:
        mu, sigma = stats.mean_cov()
        return cls(mu, sigma, stats.count, {**stats.meta, **meta, "num_samples": stats.count})


def _from_torchmetrics(state: dict, path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Moments from a FrechetInceptionDistance state dict (keys may carry a module prefix)."""
    prefix = next((k[: -len(TORCHMETRICS_KEYS[0])] for k in state
                   if isinstance(k, str) and k.endswith(TORCHMETRICS_KEYS[0])), None)
    if prefix is None or any(prefix + k not in state for k in TORCHMETRICS_KEYS):
        keys = ", ".join(sorted(str(k) for k in state)[:6]) or "(none)"
        raise ValueError(
            f"{path} is not a known FID reference: a .pth must be a torchmetrics "
            f"FrechetInceptionDistance state dict with {', '.join(TORCHMETRICS_KEYS)} (save it "
            f"after fid.persistent(True); without that the buffers are not in the state dict); "
            f"first keys found: {keys}")
    total = state[prefix + TORCHMETRICS_KEYS[0]].double().cpu()  # (F,)
    outer = state[prefix + TORCHMETRICS_KEYS[1]].double().cpu()  # (F, F)
    n = int(state[prefix + TORCHMETRICS_KEYS[2]])
    if n < 2:
        raise ValueError(f"FID reference {path} holds {n} real images; a covariance needs 2")
    # Same estimate as torchmetrics' compute() and FeatureStats.mean_cov (unbiased).
    stats = FeatureStats.from_state({"count": n, "sum": total, "sum_outer": outer})
    mu, sigma = stats.mean_cov()
    return mu, sigma, n


def _read_pth(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refusals, truncation, random bytes: all one message
        reason = str(err).split("\n", 1)[0][:200]
        raise ValueError(f"FID reference {path} is not a readable torch file with tensors only "
                         f"(weights_only=True): {type(err).__name__}: {reason}") from None
    if not isinstance(state, dict):
        raise ValueError(f"FID reference {path} holds a {type(state).__name__}, not a state dict")
    return state


def reference_format(path: str | Path) -> str | None:
    """Which format ``path`` holds, from its suffix and array names alone (None: no file).

    Anything that is not a ``.pth`` and not an ``.npz`` with ``mu``/``sigma`` but no ``meta``
    counts as our cache, so a truncated or stale cache is recomputed as before.
    """
    path = Path(path)
    if not path.is_file():
        return None
    if path.suffix == ".pth":
        return "torchmetrics-fid"
    if zipfile.is_zipfile(path):
        with np.load(path, allow_pickle=False) as data:
            files = set(data.files)
        if {"mu", "sigma"} <= files and "meta" not in files:
            return "mu-sigma-npz"
    return "tarflow-npz"


def load_reference(path: str | Path, *, expect: dict[str, Any] | None = None) -> ReferenceStats:
    """Read reference statistics in any supported format (see the module docstring).

    Args:
        path: a ``.npz`` or ``.pth`` file.
        expect: tags the statistics must match. Our cache checks all of them; external files
            can only be checked for ``img_size``, when an official file name states it.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unreadable or unknown format, too few images, other tags than
            ``expect``.
    """
    path = Path(path)
    fmt = reference_format(path)
    if fmt is None:
        raise FileNotFoundError(f"FID reference statistics {path} do not exist")
    where = {"path": str(path.resolve())}
    if fmt == "tarflow-npz":
        files: set[str] = set()
        if zipfile.is_zipfile(path):
            with np.load(path, allow_pickle=False) as data:
                files = set(data.files)
        if not {"mu", "sigma", "count", "meta"} <= files:
            raise ValueError(f"{path} is not a known FID reference: neither our .npz cache "
                             f"(mu, sigma, count, meta), a plain mu/sigma .npz nor a "
                             f"torchmetrics FrechetInceptionDistance state dict (.pth)")
        stats = FeatureStats.load(path, expect=expect)
        return ReferenceStats.from_feature_stats(stats, format=fmt, **where)
    if fmt == "mu-sigma-npz":
        with np.load(path, allow_pickle=False) as data:
            mu = data["mu"].astype(np.float64)
            sigma = data["sigma"].astype(np.float64)
            count = next((int(data[k]) for k in ("count", "n", "num_samples")
                          if k in data.files), None)
    else:
        mu, sigma, count = _from_torchmetrics(_read_pth(path), path)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"FID reference {path}: mu {mu.shape} and sigma {sigma.shape} do not "
                         f"describe one feature space")
    meta: dict[str, Any] = {"format": fmt, **where, "sha256": _sha256(path),
                            "num_samples": count}
    match = _OFFICIAL_NAME.search(path.name)
    if match:
        meta["img_size"] = int(match.group(1))
        want = (expect or {}).get("img_size")
        if want is not None and int(want) != meta["img_size"]:
            raise ValueError(f"FID reference {path} is for {meta['img_size']}px images (its "
                             f"name says so), but this run uses img_size={want}")
    return ReferenceStats(mu, sigma, count, meta)


def _extractor_name(extractor: Callable[[Tensor], Tensor]) -> str:
    return str(getattr(extractor, "name", type(extractor).__qualname__))


def load_or_compute_reference(
    path: str | Path,
    batches_fn: Callable[[], Iterable[Tensor]],
    extractor: Callable[[Tensor], Tensor],
    meta: Mapping[str, Any],
    *,
    progress: bool = False,
) -> FeatureStats | ReferenceStats:
    """Reference statistics from a cache file, (re)computing them when absent or stale.

    An external reference at ``path`` (a torchmetrics FID ``.pth`` or a plain ``mu``/``sigma``
    ``.npz``, see :mod:`tarflow.eval.references`) is returned as a ``ReferenceStats`` and never
    overwritten; a ``.pth`` that does not exist is an error, not a cache to fill.

    ``meta`` gains an ``extractor`` entry (the extractor's ``name`` attribute, else its type)
    unless it has one, so statistics from different feature networks never mix. A cache whose
    meta differs, or that cannot be read, is recomputed and overwritten with a warning. Under
    DDP, call this on one rank (or behind a barrier) so ranks do not race on the file.

    Args:
        path: Cache file (``.npz``).
        batches_fn: Returns a fresh iterable of (B, C, H, W) images in [-1, 1]; called only
            when the cache is missing or stale.
        extractor: Feature extractor.
        meta: Settings that determine the statistics (dataset, img_size, transform, ...).
        progress: Show a tqdm bar while computing.
    """
    path = Path(path)
    full_meta = {"extractor": _extractor_name(extractor), **meta}
    fmt = reference_format(path)
    if fmt not in (None, "tarflow-npz"):
        # An external reference (official torchmetrics .pth, plain mu/sigma .npz) belongs to
        # the user: used as it is, never recomputed over.
        return load_reference(path, expect=full_meta)
    if fmt is None and path.suffix == ".pth":
        raise FileNotFoundError(f"FID reference {path} does not exist; a .pth reference (a "
                                f"torchmetrics FID state dict) is only read, never computed: "
                                f"give an existing file, or an .npz path to compute and cache")
    if path.exists():
        try:
            return FeatureStats.load(path, expect=full_meta)
        except (ValueError, OSError, KeyError, zipfile.BadZipFile) as err:
            warnings.warn(f"recomputing FID reference stats: {err}", stacklevel=2)
    stats = stats_from_batches(batches_fn(), extractor, progress=progress, meta=full_meta)
    stats.save(path)
    return stats
