"""``tarflow-eval``'s metrics on N ranks: each rank scores its shard, rank 0 reports.

A rank draws (or, with ``samples=PATH``, reads) the set members
:func:`~tarflow.sampling.sample_set.shard_indices` gives it and computes their Inception
features where they are; FID's sums (n, sum f, sum f f^T) are all-reduced in float64, and the
per-sample features (2048 floats, never the images) and classifier logits are gathered on
rank 0 for IS, KID and precision/recall (:mod:`tarflow.eval.metrics`). The reference side
(statistics, and per-image features for KID and precision/recall) is read or computed on
rank 0 only, while the other ranks are done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tarflow.app.distributed import World, all_sum, any_failed, gather_to_main
from tarflow.data.subsets import fixed_subset, image_batches
from tarflow.eval.fid import FeatureStats
from tarflow.eval.metrics import (
    SampleFeatures,
    extract,
    inception_score_unavailable,
    sample_metrics,
)
from tarflow.eval.references import ReferenceStats
from tarflow.eval.sample_files import (
    IMAGE_KEY,
    load_or_compute_features,
    npz_array_info,
)
from tarflow.eval.sample_files import (
    image_batches as file_batches,
)
from tarflow.sampling.sample_set import IterationTally, shard_indices


def run_together(world: World, work: Callable[[], Any]) -> Any:
    """``work()`` on every rank; when any rank fails, all leave (the failing one re-raises)
    instead of the others waiting in the next collective until its timeout."""
    try:
        result, failure = work(), None
    except Exception as err:  # re-raised below, after the other ranks know
        result, failure = None, err
    if any_failed(failure is not None):
        if failure is not None:
            raise failure
        raise RuntimeError(f"rank {world.rank}: another rank failed; see its error line")
    return result


def features_of_file(path: str | Path, world: World, num: int, extractor: Callable,
                     samples: SampleFeatures, *, batch_size: int, device: Any) -> float:
    """Add this rank's shard of the images in ``path`` (ADM ``.npz`` or PNG folder) to
    ``samples``; returns the seconds spent on features."""
    seconds = 0.0
    for rows, images in file_batches(path, shard_indices(num, world.rank, world.size),
                                     batch_size):
        t0 = time.perf_counter()
        samples.update(*extract(extractor, images.to(device)), indices=rows)
        seconds += time.perf_counter() - t0
    return seconds


def reduce_to_main(samples: SampleFeatures, tally: IterationTally | None = None,
                   ) -> tuple[SampleFeatures | None, IterationTally | None]:
    """FID sums and the sampler's tally summed over ranks (float64); per-sample rows gathered.
    Rank 0 gets the whole set, the others None."""
    state = samples.stats.state
    summed = {k: all_sum(v) for k, v in state.items()}
    summed["count"] = summed["count"].round().long()
    total = IterationTally.from_tensor(all_sum(tally.to_tensor())) if tally else None
    payloads = gather_to_main(samples.payload() if samples.keep else None)
    if payloads is None:
        return None, None
    merged = SampleFeatures(stats=FeatureStats.from_state(summed), keep=samples.keep)
    if samples.keep:
        merged.merge(payloads)
    return merged, total


def reference_features(reference: ReferenceStats, extractor: Callable, *,
                       dataset: Any = None, subset: tuple[int, int] | None = None,
                       cache_dir: str | Path, batch_size: int, device: Any,
                       extractor_id: dict[str, Any]) -> tuple[torch.Tensor | None, str]:
    """Per-image reference features for KID and precision/recall, and where they came from.

    An ADM reference batch: its ``arr_0`` images. Our dataset cache: the same fixed subset of
    the dataset its statistics are of (``subset`` = (count, seed)). A plain ``mu``/``sigma``
    file or official ``.pth`` holds no images: (None, why). Cached (features, 8 KiB an image)
    under ``cache_dir``, keyed by the images and the extractor.
    """
    path = Path(str(reference.meta.get("path")))
    fmt = reference.meta.get("format")

    def run(batches) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([extract(extractor, x.to(device))[0].float().cpu()
                              for x in batches])

    if fmt == "mu-sigma-npz" and npz_array_info(path, IMAGE_KEY) is not None:
        count = npz_array_info(path, IMAGE_KEY)[0][0]
        meta = {"images": f"{path.name} {IMAGE_KEY}", "sha256": reference.meta.get("sha256"),
                **extractor_id}
        cache = Path(cache_dir) / f"{path.stem}-{str(meta['sha256'])[:12]}.features.npz"
        rows = range(count)
        feats = load_or_compute_features(
            cache, lambda: run(x for _, x in file_batches(path, rows, batch_size)), meta)
        return feats, f"{IMAGE_KEY} of {path} ({count} images)"
    if fmt == "tarflow-npz" and dataset is not None and subset is not None:
        indices = fixed_subset(dataset, *subset)
        meta = {**{k: reference.meta.get(k) for k in ("dataset", "img_size", "channels",
                                                     "split", "count", "subset_seed")},
                **extractor_id}
        cache = path.with_name(path.name.removesuffix(".npz") + ".features.npz")
        feats = load_or_compute_features(
            cache, lambda: run(image_batches(dataset, indices, batch_size, device)), meta)
        return feats, f"the {len(indices)} dataset images of {path.name}"
    return None, (f"the reference {path.name} ({fmt}) holds statistics only, no images: KID "
                  f"and precision/recall need an ADM reference batch (arr_0) or the dataset")


def metric_lines(results: dict[str, Any]) -> list[str]:
    """The printed summary: metrics, then the protocol."""
    shown = [("FID", "fid"), ("IS", "inception_score"), ("KID", "kid"),
             ("precision", "precision"), ("recall", "recall")]
    parts = [f"{name} {results[key]:.4f}" for name, key in shown if key in results]
    lines = [f"metrics over {results['num_samples']} samples: " + ", ".join(parts)]
    lines += [f"  not computed: {k}: {why}" for k, why in results.get("not_computed", {}).items()]
    proto = results["protocol"]
    ref = proto["reference"]
    lines.append(f"  reference: {ref.get('format')} {ref.get('path')} "
                 f"({ref.get('num_samples')} images); per-image: {ref.get('images')}")
    ext = proto["features"]
    lines.append(f"  features: {ext.get('extractor')}; weights {ext.get('weights')} "
                 f"(sha256 {str(ext.get('weights_sha256'))[:12]}); resize: {ext.get('resize')}"
                 f"; flips: {ext.get('flips')}; ranks: {proto['ranks']}")
    return lines


def score(merged: SampleFeatures, reference: ReferenceStats, ref_feats: torch.Tensor | None,
          opts: dict[str, Any], why_no_is: str | None, why_no_prc: str) -> dict[str, Any]:
    """Every metric rank 0 can compute, and why any other is missing."""
    out = sample_metrics(merged, reference.mean_cov(), ref_feats,
                         isc_splits=int(opts.get("isc_splits", 10)),
                         kid_subsets=int(opts.get("kid_subsets", 100)),
                         kid_subset_size=int(opts.get("kid_subset_size", 1000)),
                         neighborhood=int(opts.get("prc_neighborhood", 3)))
    missing = {}
    if "inception_score" not in out:
        missing["inception_score"] = why_no_is or "per-sample metrics are off"
    if "precision" not in out:
        missing["kid, precision, recall"] = why_no_prc
    return {**out, "not_computed": missing}


__all__ = ["features_of_file", "inception_score_unavailable", "metric_lines", "reduce_to_main",
           "reference_features", "run_together", "score"]
