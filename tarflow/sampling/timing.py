"""Timing for the planner: one candidate on one block (stopped past a budget), single network
passes, and a convergence test, each on the device and batch that will sample; and the
convergence-test interval that follows from them."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace

import torch

from tarflow.model import Guidance, TarFlow
from tarflow.sampling.convergence import convergence_test
from tarflow.sampling.plan import Candidate
from tarflow.sampling.sample import _sync
from tarflow.sampling.schedule import BlockSchedule
from tarflow.sampling.solve import solve_block


class OverBudget(Exception):
    """Raised from a solver callback to abandon a candidate that is already too slow."""


def time_candidate(block, x: torch.Tensor, y, cand: BlockSchedule, guidance: Guidance,
                   nets: dict[str, TarFlow], budget: float | None,
                   guess: torch.Tensor | None = None) -> tuple[float, torch.Tensor | None, int]:
    """(seconds, block output or None if abandoned, critical-path passes) of one candidate.

    Times exactly what sampling runs for the block: :func:`solve_block` (``nets``: the model's
    low-precision copies by dtype name; ``guess``: a supplied initial guess, raster order, for a
    candidate with ``init="student"``). An abandoned Jacobi run reports the time
    it was stopped at (a lower bound); an abandoned sequential loop reports that time scaled to
    all N - 1 steps (its steps cost nearly the same), which is what makes a plan's predicted
    speed-up over sequential an estimate rather than a bound.
    """
    N = block.num_patches
    _sync(x.device)
    t0 = time.perf_counter()
    deadline = None if budget is None else t0 + budget
    steps = [0]  # sequential steps done

    def stop_if_late(info=None) -> None:
        if isinstance(info, int):
            steps[0] = info + 1
        if time.perf_counter() > deadline:
            raise OverBudget

    callback = None if deadline is None else stop_if_late
    try:
        out, stats = solve_block(block, x, y, cand, guidance=guidance, nets=nets,
                                 guess=guess, callback=callback, on_step=callback)
    except OverBudget:
        seconds = time.perf_counter() - t0
        if cand.is_sequential(N):
            seconds *= (N - 1) / max(steps[0], 1)
        return seconds, None, 0
    _sync(x.device)
    return time.perf_counter() - t0, out, stats.total_iters


def pass_seconds(model: TarFlow, nets: dict[str, TarFlow], noise: torch.Tensor, y,
                  guidance: Guidance) -> dict[tuple[str | None, str], float]:
    """Seconds of one network pass of the first sampled block at the sampling batch, per
    network dtype (None: full precision) and feed: "long" (N - 1 tokens: Jacobi), "short"
    (N / 8 tokens: GS) and "one" (a sequential step). Also warms up the kernels the candidates
    use, so that no candidate pays a first call."""
    block = model.blocks[-1]
    B, N = noise.shape[:2]
    feeds = {"long": (0, N - 1), "short": (N - 1 - max(1, N // 8), N - 1),
             "one": (N - 2, N - 1)}
    rows = B * (2 if guidance.active else 1)
    times: dict[tuple[str | None, str], float] = {}
    for d, net in [(None, model), *nets.items()]:
        nb = net.blocks[block.index]
        ndtype = next(nb.parameters()).dtype
        cache = nb.new_cache(rows, dtype=ndtype, device=noise.device)
        cond = nb.class_bias(guidance.labels(y, B, noise.device))
        q_scale = guidance.q_scale(B, noise.device, ndtype)
        for length, (s, e) in feeds.items():
            fed = guidance.expand(noise[:, s:e]).to(ndtype)
            samples = []
            # The first call warms up; the least of four: a stall only ever slows a call, and
            # the low/full ratio decides whether a low-precision network is timed at all.
            for rep in range(5):
                _sync(noise.device)
                t0 = time.perf_counter()
                nb.predict(fed, cond=cond, start=s, cache=cache, q_scale=q_scale)
                _sync(noise.device)
                if rep:
                    samples.append(time.perf_counter() - t0)
            times[(d, length)] = min(samples)
    return times


def test_seconds(segment: torch.Tensor, tol: float) -> float:
    """Median wall time of one convergence test on a segment of this shape."""
    delta = segment * 1e-3
    samples = []
    for _ in range(5):
        _sync(segment.device)
        t0 = time.perf_counter()
        convergence_test(delta, segment, tol, True)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def with_test_interval(chosen: dict[int, BlockSchedule], timed: dict[int, Candidate],
                       noise: torch.Tensor, tol: float, max_every: int
                       ) -> dict[int, BlockSchedule]:
    """Set each Jacobi block's ``check_every`` from its measured pass and test costs."""
    if tol <= 0:
        return chosen  # at tol = 0 only the cap is tested anyway
    N = noise.shape[1]
    out = {}
    for b, s in chosen.items():
        entry = timed[b]
        if s.is_sequential(N) or entry.iters <= 0:
            out[b] = s
            continue
        S = len(s.boundaries(N)) - 1
        L = max(1, N // S)
        t_pass = entry.cost / entry.iters
        t_test = test_seconds(noise[:, :L], tol)
        per_segment = entry.iters / S
        k = round(math.sqrt(2 * per_segment * t_test / max(t_pass, 1e-12)))
        out[b] = replace(s, check_every=max(1, min(max_every, k)))
    return out
