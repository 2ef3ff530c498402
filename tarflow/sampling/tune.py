"""Device-aware choice of the tough blocks' segment count, by timing on the actual device and batch.

Superseded by the planner (``tarflow.sampling.planner``, ``schedule: auto``), which decides every
block, the sequential loop included; kept as the ``auto:tuned`` comparison row of
``tarflow-bench``.

The CRM/IGM ranking says *which* blocks are tough and which initial guess suits them; it cannot say
how many GS segments pay, because that is a property of the hardware and batch size, not of the
weights. A segment of L tokens costs one network pass over L tokens per iteration: where passes
are compute-bound (GPUs at large batch, CPUs beyond a few samples) fewer tokens per pass win and
many segments pay; where a pass is overhead-bound (a CPU at batch 1) a short pass costs nearly as
much as a full one and one segment with fewer iterations wins. Measured on the 2-core CPU with
the demo model: 8 segments were 15% slower than 1 at batch 1 and 10% faster at batch 4.

``tune_segments`` therefore times a few candidate counts for the tough blocks on the caller's
noise batch and keeps the fastest. All candidates use the same stopping tolerance, so they are
equally accurate; the choice costs a few sampling runs once per (model, device, batch).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from tarflow.model import TarFlow
from tarflow.sampling.sample import _sync, sample
from tarflow.sampling.schedule import SEQUENTIAL, SamplingSchedule


@torch.no_grad()
def tune_segments(model: TarFlow, schedule: SamplingSchedule, noise: torch.Tensor,
                  y: torch.Tensor | None = None, *, candidates: tuple[int, ...] = (1, 2, 4, 8),
                  repeats: int = 3, **knobs) -> tuple[SamplingSchedule, dict[int, float]]:
    """The schedule with the segment count of its segmented blocks set to the fastest candidate.

    Args:
        schedule: e.g. from ``schedule_from_ranking``; blocks listed with more than one segment
            are the ones tuned (all to the same count). Nothing to tune returns it unchanged.
        noise, y: a batch of the size that will be sampled (timing depends on it).
        candidates: segment counts to try (capped at N).
        repeats: timed runs per candidate (median), after one warm-up run.
        knobs: passed to ``sample`` (guidance, net_dtype, ...).

    Returns:
        (tuned schedule, {segments: median seconds}).
    """
    tough = [b for b, s in schedule.blocks.items() if s.segments not in (1, SEQUENTIAL)]
    if not tough:
        return schedule, {}
    if repeats < 1 or not candidates:
        raise ValueError("tune_segments needs repeats >= 1 and at least one candidate")
    N = model.config.num_patches
    timings: dict[int, float] = {}
    options: dict[int, SamplingSchedule] = {}
    for S in sorted({min(int(c), N) for c in candidates}):
        if S < 1:
            raise ValueError(f"candidate segment count {S} must be >= 1")
        blocks = {b: replace(s, segments=S) if b in tough else s
                  for b, s in schedule.blocks.items()}
        option = replace(schedule, blocks=blocks, name="")
        sample(model, noise, y, option, **knobs)  # warm-up
        times = []
        for _ in range(repeats):
            _sync(noise.device)
            t0 = time.perf_counter()
            sample(model, noise, y, option, **knobs)
            _sync(noise.device)
            times.append(time.perf_counter() - t0)
        timings[S] = statistics.median(times)
        options[S] = option
    best = min(timings, key=timings.get)
    return options[best], timings
