"""The convergence test of a Jacobi / GS-Jacobi segment (ALGORITHMS.md §4).

A sample has converged when its relative residual mean((X' - X)^2) / mean(X'^2) over the
segment is within ``tol``; with freezing, leading positions whose own change is that small stop
being fed. Residuals are computed in at least float32 and read back to the host once per test.
"""

from __future__ import annotations

import torch


def relative_residual(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """(B,) mean((new - old)^2) / mean(new^2) over all but the batch dim, in >= float32.

    At least float32 because a bf16 difference of nearly equal iterates is meaningless; float64
    iterates keep float64 so that tol = 0 means an exact fixed point in the working precision.
    """
    return convergence_test(new - old, new, 0.0, False)[0]


def convergence_test(delta: torch.Tensor, segment: torch.Tensor, tol: float, freeze: bool
                     ) -> tuple[torch.Tensor, int, bool]:
    """One convergence test of a segment: few kernels and a single read-back to the host.

    The relative residual of a sample is mean(delta^2) / mean(segment^2) over the segment's
    L positions and D dims, with frozen positions contributing no change; as sums, that is
    sum(delta^2) / sum(segment^2). A position may freeze when its own share of it, times L
    (its mean squared change relative to the segment's), is within tol for every sample.

    Args:
        delta: (B, L', D) change of the unfrozen tail; segment: (B, L, D) the segment after it.

    Returns:
        (residual (B,) in >= float32, how many further leading positions may freeze (0
        without ``freeze``), whether any sample is done: converged, or non-finite).
    """
    dtype = torch.promote_types(delta.dtype, torch.float32)
    if delta.dtype != dtype:
        delta, segment = delta.to(dtype), segment.to(dtype)
    if freeze:
        power = segment.square().sum((1, 2)).clamp_min(1e-30)  # (B,)
        share = delta.square().sum(-1) / power[:, None]  # (B, L'): position shares of res
        res = share.sum(1)
        lead = (share.amax(0) <= tol / segment.shape[1]).to(dtype).cumprod(0).sum()
    else:  # fewest kernels: this is the only test of a fixed-count solve
        res = (torch.linalg.vector_norm(delta, dim=(1, 2))
               / torch.linalg.vector_norm(segment, dim=(1, 2)).clamp_min(1e-15)).square()
    # NaN and inf count as done (-1): one minimum says whether any sample is.
    low = torch.nan_to_num(res, nan=-1.0, posinf=-1.0).amin()
    if not freeze:
        return res, 0, low.item() <= tol
    low, lead = torch.stack([low, lead]).tolist()
    return res, int(lead), low <= tol


def done_mask(res: torch.Tensor, tol: float) -> torch.Tensor:
    """(B,) bool: converged, or non-finite (NaN compares False both ways)."""
    return ~((res > tol) & (res < float("inf")))


def non_finite_rows(res: torch.Tensor, rows: torch.Tensor) -> list[int]:
    """Sample ids among ``rows`` whose residual (hence iterate) is not finite."""
    bad = ~torch.isfinite(res)
    return rows[bad].tolist() if bool(bad.any()) else []
