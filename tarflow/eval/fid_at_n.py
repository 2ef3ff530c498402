"""FID@N and sample grids: the one loop that samples a fixed set, decodes it and extracts features.

The validation callback, ``tarflow-eval``, ``tarflow-bench --fid`` and ``tarflow-sample`` all run
:func:`draw_set`, whose member ``i`` starts from seed ``seed + i``
(:func:`tarflow.sampling.sample_set.fixed_inputs`): the same checkpoint, sampler and seed give the
same images through each of them, on any device, batch size or number of ranks. A notebook::

    loaded = load_for_sampling(ckpt)
    settings = parse_sampler({"schedule": "jacobi", "tol": 1e-3})
    reference = load_reference("data/fid_stats/demo_16px_c1_train300.npz")
    fid, run = fid_at_n(loaded.net, settings.resolve(None, loaded.net.config.num_patches),
                        reference, feature_extractor(None), num_samples=100,
                        knobs=settings.knobs, space=loaded.space)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tarflow.eval.fid import FeatureStats, frechet_distance
from tarflow.eval.inception import InceptionFeatures
from tarflow.eval.likelihood import progress_bar
from tarflow.eval.metrics import SampleFeatures, extract
from tarflow.eval.references import ReferenceStats
from tarflow.model.space import PixelSpace
from tarflow.model.student import is_student
from tarflow.model.tarflow import TarFlow
from tarflow.sampling.sample_set import (
    Draw,
    IterationTally,
    Label,
    SampledBatch,
    sample_batches,
)
from tarflow.sampling.schedule import SamplingSchedule


@dataclass
class SetRun:
    """What sampling a set produced besides its images: sampler cost, features, side costs."""

    tally: IterationTally
    features: FeatureStats | None = None
    decode_seconds: float = 0.0
    feature_seconds: float = 0.0


def feature_extractor(extractor: Callable | None = None, *, weights: str | None = None,
                      batch_size: int = 64, device: torch.device | str = "cpu") -> Callable:
    """``extractor`` (a module is moved to ``device`` in eval mode), or Inception from a local
    ``weights`` file (None: the default location, see ``tarflow-fid-weights``)."""
    if extractor is None:
        extractor = InceptionFeatures(weights, batch_size=batch_size)
    if isinstance(extractor, torch.nn.Module):
        extractor = extractor.to(device).eval()
    return extractor


@torch.no_grad()
def draw_set(net: TarFlow, indices: Sequence[int], schedule: SamplingSchedule | None = None,
               *, seed: int, batch_size: int, knobs: dict | None = None,
               space: PixelSpace | None = None, extractor: Callable | None = None,
               label: Label = None, trace: Callable[[dict], None] | None = None,
               draw: Draw | None = None,
               on_batch: Callable[[SampledBatch, torch.Tensor], None] | None = None,
               progress: bool = False, desc: str = "sampling",
               samples: SampleFeatures | None = None) -> SetRun:
    """Sample the set members ``indices`` in batches, decode each batch to images, hand it to
    ``on_batch(batch, images)`` (files, grids) and, given an ``extractor``, add its features.

    Args:
        schedule, knobs, label, trace, draw: as for
            :func:`tarflow.sampling.sample_set.sample_batches`.
        space: decodes a latent model's samples (default: pixels).
        extractor: images (B, C, H, W) in [-1, 1] -> features (B, F); None: no features.
        progress: a progress bar over batches.
        samples: also keep each member's features (and an extractor's classifier logits)
            here, keyed by member index, for IS, KID and precision/recall
            (:mod:`tarflow.eval.metrics`); ``run.features`` is then ``samples.stats``.
    """
    space = space or PixelSpace(net.config)
    # A distilled student solves no blocks: no per-block iterations to count (or to chart).
    blocks = 0 if is_student(net) else net.config.num_blocks
    run = SetRun(IterationTally(blocks),
                 FeatureStats() if extractor is not None else None)
    if samples is not None and extractor is not None:
        run.features = samples.stats
    batches = sample_batches(net, indices, schedule, seed=seed, batch_size=batch_size,
                             knobs=knobs, label=label, trace=trace, draw=draw)
    total = math.ceil(len(indices) / batch_size)
    for batch in progress_bar(batches, total, progress, desc):
        run.tally.add(batch)
        t0 = time.perf_counter()
        images = space.decode(batch.images).float()  # (B, C, H, W); latents decoded in chunks
        t1 = time.perf_counter()
        run.decode_seconds += t1 - t0
        if on_batch is not None:
            on_batch(batch, images)
        if samples is not None and extractor is not None:
            samples.update(*extract(extractor, images), indices=batch.indices)
        elif run.features is not None:
            run.features.update(extractor(images))
        if run.features is not None:
            run.feature_seconds += time.perf_counter() - t1
    return run


def fid_at_n(net: TarFlow, schedule: SamplingSchedule | None,
             reference: ReferenceStats | FeatureStats, extractor: Callable, *,
             num_samples: int, seed: int = 0, batch_size: int = 64,
             **kwargs) -> tuple[float, SetRun]:
    """FID of the first ``num_samples`` members of the fixed set against ``reference``, and the
    run behind it. ``kwargs``: the rest of :func:`draw_set` (knobs, space, draw, progress)."""
    if num_samples < 2:
        raise ValueError(f"FID needs at least 2 samples, not {num_samples}")
    run = draw_set(net, range(num_samples), schedule, seed=seed, batch_size=batch_size,
                     extractor=extractor, desc=f"FID@{num_samples}", **kwargs)
    mu, sigma = run.features.mean_cov()
    ref_mu, ref_sigma = reference.mean_cov()
    return frechet_distance(mu, sigma, ref_mu, ref_sigma), run


def class_grid(net: TarFlow, schedule: SamplingSchedule, *, per_class: int = 8,
               max_classes: int = 10, seed: int = 0, knobs: dict | None = None,
               space: PixelSpace | None = None) -> torch.Tensor:
    """(rows * per_class, C, H, W) decoded samples for a grid with one row per class (a
    conditional model; unconditional: ``max_classes`` rows of the set's members)."""
    cfg = net.config
    rows = min(cfg.num_classes, max_classes) if cfg.conditional else max_classes
    knobs = dict(knobs or {})
    if not cfg.conditional and knobs.get("attn_temp", 1.0) == 1.0:
        knobs["guidance"] = 0.0  # both guidance branches would be identical: a no-op here
    images: list[torch.Tensor] = []
    draw_set(net, range(rows * per_class), schedule, seed=seed, batch_size=rows * per_class,
               knobs=knobs, space=space, label=lambda i: i // per_class,
               on_batch=lambda batch, decoded: images.append(decoded))
    return torch.cat(images)
