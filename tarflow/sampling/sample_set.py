"""A fixed, per-sample-seeded set of samples, drawn in batches and sharded over ranks.

Sample ``i`` of a set always starts from a generator seeded with ``seed + i``: its noise is drawn
first, then its label. A rank therefore needs nothing but the indices it owns, and the union of the
shards equals the single-process set whatever the world size. Shards are strided (rank ``r`` owns
``r, r + W, r + 2W, ...``) so every rank gets the same amount of work to within one sample.

The validation callback, ``tarflow-sample``, ``tarflow-eval`` and ``tarflow-bench --fid`` all draw
their samples here, so one seed gives the same images through each of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tarflow.model import TarFlow
from tarflow.sampling.sample import SampleStats, sample
from tarflow.sampling.schedule import SamplingSchedule

if TYPE_CHECKING:  # annotations only: the settings import the sampler, not this module
    from tarflow.sampling.plan import Plan
    from tarflow.sampling.settings import SamplerSettings


def shard_indices(total: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The indices of a set of ``total`` samples that rank ``rank`` of ``world_size`` draws."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")
    return list(range(rank, total, world_size))


# One class for every member, or a member's class from its index (a grid with a row per class).
Label = int | Callable[[int], int] | None
# A sampler other than sample(net, ..., schedule): (noise, labels) -> (images, stats or None).
Draw = Callable[[torch.Tensor, "torch.Tensor | None"], "tuple[torch.Tensor, SampleStats | None]"]


def fixed_inputs(net: TarFlow, indices: Sequence[int], seed: int, *,
                 label: Label = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Noise and labels of the given set members, identical on any device and rank.

    Args:
        net: the model (gives the shapes, the prior variance, device and dtype).
        indices: set members to draw, any order.
        seed: base seed; member ``i`` uses ``seed + i``.
        label: a class for every sample of a conditional model, or a function from a member's
            index to its class; None draws one per sample (after its noise, from its seed).

    Returns:
        noise (B, N, D) on the model's device and dtype, and labels (B,) int64 or None
        (unconditional model).
    """
    cfg = net.config
    std = net.var.detach().sqrt().float().cpu()  # (N, D)
    noises, labels = [], []
    for i in indices:
        # A CPU generator in float32: the same numbers whatever device or dtype samples them.
        gen = torch.Generator().manual_seed(int(seed) + int(i))
        noises.append(torch.randn(cfg.num_patches, cfg.token_dim, generator=gen) * std)
        if cfg.conditional:
            drawn = torch.randint(cfg.num_classes, (), generator=gen)
            if label is not None:
                drawn = torch.tensor(int(label(int(i)) if callable(label) else label))
            labels.append(drawn)
    dtype = net.var.dtype
    device = net.var.device
    noise = torch.stack(noises).to(device=device, dtype=dtype) if noises else torch.empty(
        0, cfg.num_patches, cfg.token_dim, device=device, dtype=dtype)
    if not cfg.conditional:
        return noise, None
    y = torch.stack(labels).to(device) if labels else torch.empty(0, dtype=torch.long,
                                                                  device=device)
    return noise, y


@dataclass
class SampledBatch:
    """One batch of a set: which members, their labels and images, and what it cost."""

    indices: list[int]
    labels: torch.Tensor | None  # (B,) int64
    images: torch.Tensor  # (B, C, H, W), nominally [-1, 1]
    stats: SampleStats


def sample_batches(net: TarFlow, indices: Sequence[int], schedule: SamplingSchedule, *,
                   seed: int, batch_size: int, knobs: dict | None = None,
                   label: Label = None,
                   trace: Callable[[dict], None] | None = None,
                   draw: Draw | None = None) -> Iterator[SampledBatch]:
    """Sample the given set members in batches, one :class:`SampledBatch` at a time.

    Only one batch of images is alive at a time, so a 50k-image FID set streams through.

    Args:
        net: the model, in eval mode.
        indices: set members to draw (a rank's shard), in order.
        schedule: the sampling schedule.
        seed: base seed of the set (see :func:`fixed_inputs`).
        batch_size: samples per call of the sampler.
        knobs: keyword arguments for :func:`tarflow.sampling.sample`.
        label: as for :func:`fixed_inputs`.
        trace: per-iteration callback of the Jacobi solver, passed for the first batch only
            (later batches would repeat the same story).
        draw: another sampler for the same inputs, ``draw(noise, y) -> (images, stats or
            None)`` (a benchmark's method); ``schedule`` and ``knobs`` are then unused.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        noise, y = fixed_inputs(net, chunk, seed, label=label)
        if draw is not None:
            images, stats = draw(noise, y)
        else:
            images, stats = sample(net, noise, y, schedule,
                                   callback=trace if start == 0 else None, **(knobs or {}))
        yield SampledBatch(chunk, y, images, stats or SampleStats())


@dataclass
class IterationTally:
    """Running totals of sampler cost over batches (addable across ranks as one vector).

    ``iters[b]`` sums, over batches, block b's critical-path iterations (network passes of the
    slowest sample, summed over segments); divided by ``batches`` it is the per-batch latency cost.
    """

    num_blocks: int
    images: int = 0
    batches: int = 0
    seconds: float = 0.0
    fallback: int = 0
    iters: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.iters:
            self.iters = [0.0] * self.num_blocks

    def add(self, batch: SampledBatch) -> None:
        self.images += len(batch.indices)
        self.batches += 1
        self.seconds += batch.stats.seconds
        self.fallback += batch.stats.fallback
        for b, n in batch.stats.iters.items():
            self.iters[b] += n

    def to_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(4 + T,) float64: images, batches, seconds, fallback, iterations per block."""
        values = [self.images, self.batches, self.seconds, self.fallback, *self.iters]
        return torch.tensor(values, dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> IterationTally:
        v = t.double().cpu().tolist()
        return cls(len(v) - 4, int(v[0]), int(v[1]), float(v[2]), int(v[3]), v[4:])

    def mean_iters(self) -> dict[int, float]:
        """Per block, critical-path iterations per batch (0 when nothing was sampled)."""
        return {b: n / max(self.batches, 1) for b, n in enumerate(self.iters)}

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.images if self.images else math.nan


def run_summary(settings: SamplerSettings, schedule: SamplingSchedule, tally: IterationTally,
                plan: Plan | None = None) -> dict[str, Any]:
    """JSON-ready timing and iteration numbers of a sampling run (and its plan, if planned:
    the measured speed-up compares the run's seconds per batch with the sequential loop's as
    the planner timed it at the same batch size)."""
    extra = {}
    if plan is not None and tally.batches:
        extra = {"plan": plan.to_dict(),
                 "speedup_vs_planned_sequential": plan.sequential_seconds
                 / max(tally.seconds / tally.batches, 1e-12)}
    return {
        "sampler": settings.name,
        "schedule": schedule.describe(),
        "knobs": settings.knobs,
        "num_samples": tally.images,
        "seconds": tally.seconds,
        "seconds_per_image": tally.seconds_per_image,
        "iters_per_block": {str(b): n for b, n in tally.mean_iters().items()},
        "fallback": tally.fallback,
        **extra,
    }


class ConvergenceTrace:
    """Collects the Jacobi solver's trace: per block, the largest relative residual over the
    samples still iterating, against the iteration count summed over the block's segments.

    Pass an instance as ``callback`` of :func:`tarflow.sampling.sample` (or ``trace`` of
    :func:`sample_batches`).
    """

    def __init__(self) -> None:
        self.points: dict[int, list[tuple[int, float]]] = {}
        self._last_segment: dict[int, int] = {}
        self._offset: dict[int, int] = {}

    def __call__(self, info: dict) -> None:
        block, seg, it = int(info["block"]), int(info["segment"]), int(info["iteration"])
        residual = info.get("residual")
        if residual is None or residual.numel() == 0:
            return
        pts = self.points.setdefault(block, [])
        if self._last_segment.get(block) != seg:
            # A new segment restarts its iteration counter: continue the block's x axis.
            self._offset[block] = pts[-1][0] if pts else 0
            self._last_segment[block] = seg
        pts.append((self._offset[block] + it, float(residual.detach().float().max())))

    def series(self) -> dict[int, tuple[list[int], list[float]]]:
        """Per block (sorted), the iteration numbers and residuals."""
        return {b: ([x for x, _ in p], [r for _, r in p]) for b, p in sorted(self.points.items())}


def compare_with_sequential(net: TarFlow, schedule: SamplingSchedule, indices: Sequence[int],
                            seed: int, knobs: dict) -> list[float]:
    """[seconds with ``schedule``, seconds sequential, samples, max abs error] on the set's
    members ``indices`` (all zeros for none).

    Both run twice, alternating, and the faster run of each counts: one run each let a passing
    hiccup of the machine decide a speed-up near 1. A schedule that is the sequential loop in
    every block (what the planner picks for large batches on a CPU) is the same computation: it
    runs once and counts for both (speed-up 1, error 0), rather than reporting the noise between
    two runs of it as a speed-up.
    """
    if not indices:
        return [0.0, 0.0, 0.0, 0.0]
    noise, y = fixed_inputs(net, indices, seed)
    cfg = net.config
    same = all(schedule.for_block(b).is_sequential(cfg.num_patches)
               for b in range(cfg.num_blocks))
    runs = {"exact": (SamplingSchedule.sequential(), [])}
    if not same:
        runs["fast"] = (schedule, [])
    images = {}
    for _ in range(1 if same else 2):
        for name, (sched, seconds) in runs.items():
            images[name], stats = sample(net, noise, y, sched, **knobs)
            seconds.append(stats.seconds)
    fast = "exact" if same else "fast"
    return [min(runs[fast][1]), min(runs["exact"][1]), float(len(indices)),
            max_abs_error(images[fast], images["exact"])]


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, in float64 (inf if either side is non-finite)."""
    diff = (a.double() - b.double()).abs()
    return float(diff.max()) if diff.numel() else 0.0


def save_shard(path: str | Path, batches: Sequence[SampledBatch], *, schedule: str = "") -> Path:
    """Write sampled batches as one ``.npz``: ``indices`` (n,), ``labels`` (n,) (empty for an
    unconditional model), ``images`` (n, C, H, W) float32 as sampled and ``schedule`` (the
    schedule's text form, so every rank's shard says what it was sampled with)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = [b.labels.cpu() for b in batches if b.labels is not None]
    images = [b.images.float().cpu() for b in batches]
    np.savez(path, indices=np.array([i for b in batches for i in b.indices], dtype=np.int64),
             labels=torch.cat(labels).numpy() if labels else np.zeros(0, np.int64),
             images=torch.cat(images).numpy() if images else np.zeros(0, np.float32),
             schedule=np.array(schedule))
    return path
