"""One block's solve: the seam every sampler path goes through.

:func:`solve_block` takes a block, its :class:`BlockSchedule`, its sampling input and the guidance,
and runs what the schedule says: nothing (a block of 0 layers), the exact sequential loop, or
Jacobi / GS-Jacobi (:func:`tarflow.sampling.jacobi.gs_jacobi_block`) from the block's initial
guess (:func:`tarflow.sampling.fixed_point.initial_guess`: the schedule's named ``init``, or a
guess the caller supplies). :func:`tarflow.sampling.sample` calls it for every block, and the
planner (:func:`tarflow.sampling.timing.time_candidate`) times exactly this call, so a plan
measures what sampling runs. A new way to solve a block is a branch here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from tarflow.model.flow import FlowBlock
from tarflow.model.guidance import Guidance
from tarflow.model.tarflow import TarFlow
from tarflow.sampling.jacobi import BlockStats, TraceFn, gs_jacobi_block
from tarflow.sampling.precision import dtype_name, network_copy
from tarflow.sampling.schedule import BlockSchedule


def solve_block(block: FlowBlock, x: torch.Tensor, y: torch.Tensor | None,
                settings: BlockSchedule, *, guidance: Guidance,
                nets: Mapping[str, TarFlow] | None = None, guess: torch.Tensor | None = None,
                callback: TraceFn | None = None, on_step: Callable[[int], None] | None = None
                ) -> tuple[torch.Tensor, BlockStats]:
    """Invert one block as ``settings`` says.

    Args:
        block: the flow block.
        x: (B, N, D) its sampling input (the next block's output), raster order.
        y: (B,) labels or None.
        settings: this block's schedule.
        guidance: the sampling call's guidance (the block narrows it to what it supports).
        nets: lower-precision copies of the whole model by dtype name
            (:func:`tarflow.sampling.precision.network_copy`); a Jacobi block whose
            ``net_dtype`` differs from x's dtype runs its network passes in ``nets[net_dtype]``.
        guess: (B, N, D) a caller's initial guess in raster order, used instead of
            ``settings.init`` (Jacobi / GS-Jacobi only; the sequential loop needs none).
        callback: the Jacobi solver's per-iteration trace (see ``gs_jacobi_block``).
        on_step: the sequential loop's per-step hook, called with the step index.
            Either hook may raise to abandon the block (the planner stops slow candidates so).

    Returns:
        x (B, N, D) raster order, and the block's stats (``seconds`` left for the caller).
    """
    B, N = x.shape[:2]
    if block.is_identity:  # a block of 0 layers: nothing to solve
        return x, BlockStats(block.index, 0, iters=[0],
                             sample_iters=torch.zeros(B, dtype=torch.long, device=x.device),
                             residual=torch.zeros(B, device=x.device))
    if settings.is_sequential(N):
        out = block.reverse(x, y, guidance=guidance, callback=on_step)
        return out, BlockStats(block.index, N, iters=[N - 1],
                               sample_iters=torch.full((B,), N - 1, device=x.device),
                               residual=torch.zeros(B, device=x.device))
    low = settings.net_dtype
    net = None
    if low is not None and low != dtype_name(x.dtype):
        if nets is None:
            raise ValueError(f"block {block.index} runs its network in {low}: pass nets, "
                             f"its low-precision copy of the model")
        net = nets[low].blocks[block.index]
    return gs_jacobi_block(block, x, y, settings, guidance=guidance, callback=callback, net=net,
                           guess=guess)


class NetworkCopies(dict):
    """Lower-precision copies of a model by dtype name, each made on first use (a sampling
    call converts the model once per dtype its schedule names, and only if a block runs it)."""

    def __init__(self, model: TarFlow) -> None:
        super().__init__()
        self.model = model

    def __missing__(self, name: str) -> TarFlow:
        self[name] = copy = network_copy(self.model, getattr(torch, name))
        return copy
