"""Jacobi and GS-Jacobi inversion of one flow block (ALGORITHMS.md §4).

Sampling a block solves, in the block's token order, the lower-triangular system
    x_0 = z_0,    x_i = z_i * exp(a_i(x_<i)) + b_i(x_<i).
GS-Jacobi cuts positions [0, N) into S contiguous segments solved in order. Inside a segment
[p, e) Jacobi updates every position at once from the previous iterate,
    X^(k+1)_[p,e) = z_[p,e) * exp(a(X^(k))) + b(X^(k)),
feeding tokens [p-1, e-1) through the transformer while attending to the cached keys/values of all
earlier segments. Prefix position p + k is exact after k + 1 iterations, so ``e - p`` iterations
solve a segment exactly; the stopping test usually ends it far sooner. Iteration k + 1 therefore
only feeds the tokens from that exact frontier on (the finished prefix's K/V stay cached).

Per-sample early exit: a sample whose residual falls below ``tol`` is written back and dropped from
the working batch (its rows of the KV cache too), so converged samples cost nothing further.
Overflow guard: a sample whose iterate goes non-finite is dropped from the block and re-solved with
the exact sequential loop, with a warning; no NaN leaves this module silently.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tarflow.model.attention import KVCache
from tarflow.model.flow import FlowBlock, exp32
from tarflow.model.guidance import Guidance
from tarflow.model.permutation import permute
from tarflow.sampling.schedule import BlockSchedule

TraceFn = Callable[[dict], None]


@dataclass
class BlockStats:
    """What solving one block cost.

    Attributes:
        block: forward block id.
        segments: number of segments used.
        iters: per segment, the iterations run (the most any sample needed): the latency cost.
        sample_iters: (B,) total iterations each sample took over all segments.
        residual: (B,) each sample's last relative residual (max over segments).
        fallback: number of samples re-solved sequentially after a non-finite iterate.
        seconds: wall time of the block (filled in by ``sample``).
    """

    block: int
    segments: int
    iters: list[int] = field(default_factory=list)
    sample_iters: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    fallback: int = 0
    seconds: float = 0.0

    @property
    def total_iters(self) -> int:
        """Sum over segments of the iterations run: network passes on the critical path."""
        return int(sum(self.iters))


def relative_residual(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """(B,) mean((new - old)^2) / mean(new^2) over all but the batch dim, in >= float32.

    At least float32 because a bf16 difference of nearly equal iterates is meaningless; float64
    iterates keep float64 so that tol = 0 means an exact fixed point in the working precision.
    """
    return _position_change(new - old, new).mean(1)


def _position_change(delta: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """(B, L') per-position mean squared change over D, relative to the segment's mean square.

    Their sum over the segment's L positions, divided by L, is the segment's relative residual;
    one pass gives both the stopping test and the freezing test.

    Args:
        delta: (B, L', D) the change of the updated tail of the segment (new - old).
        segment: (B, L, D) the whole segment after the step (L >= L').
    """
    dtype = torch.promote_types(delta.dtype, torch.float32)
    scale = segment.to(dtype).square().flatten(1).mean(1, keepdim=True).clamp_min(1e-30)
    return delta.to(dtype).square().mean(-1) / scale


def convergence_test(delta: torch.Tensor, segment: torch.Tensor, tol: float, freeze: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """One convergence test of a segment, with a single read-back to the host.

    Args:
        delta: (B, L', D) change of the unfrozen tail; segment: (B, L, D) the segment after it.

    Returns:
        (residual (B,), done (B,) bool: converged or non-finite, how many further leading
        positions may freeze (every sample within tol; 0 without ``freeze``), whether any
        sample is done).
    """
    change = _position_change(delta, segment)  # (B, L')
    res = change.sum(1) / segment.shape[1]  # (B,) relative residual of the whole segment
    # NaN compares False both ways and inf fails "< inf": both count as done (to be retired).
    done = ~((res > tol) & (res < float("inf")))
    lead = (change.amax(0) <= tol).int().cumprod(0).sum() if freeze else done.new_zeros(())
    lead, any_done = torch.stack([lead.to(torch.long), done.any().to(torch.long)]).tolist()
    return res, done, lead, bool(any_done)


def _net_rows(rows: torch.Tensor, batch: int, guided: bool) -> torch.Tensor:
    """Network-batch rows of sample rows: the cond rows, then their uncond twins at + B."""
    return torch.cat([rows, rows + batch]) if guided else rows


@torch.no_grad()
def gs_jacobi_block(block: FlowBlock, z: torch.Tensor, y: torch.Tensor | None,
                    schedule: BlockSchedule, *, guidance: Guidance = Guidance(),
                    callback: TraceFn | None = None,
                    net: FlowBlock | None = None) -> tuple[torch.Tensor, BlockStats]:
    """Invert one block by GS-Jacobi.

    Convergence is tested every ``schedule.check_every`` iterations and on each segment's last
    one. At ``tol = 0`` only the last iteration is tested: a residual of exactly zero before the
    cap is too rare to pay for a test (a few small kernels and a host read) every iteration, and
    the frontier still advances one exact position per iteration without one.

    Args:
        block: the flow block.
        z: (B, N, D) the block's output (its sampling input), raster order.
        y: (B,) labels or None.
        schedule: segments, iteration cap, initial guess, tolerance, test interval.
        guidance: CFG / attention-temperature guidance.
        callback: called after every iteration with {"block", "segment", "iteration",
            "residual" (per active sample, float32; None on untested iterations), "active"}.
            It may raise to abandon the block (the planner stops over-budget candidates so).
        net: a copy of ``block`` in a lower precision (``precision.network_copy``) that runs
            the iterations' network passes; iterates, update and stopping test keep z's dtype.

    Returns:
        x (B, N, D) raster order, and the block's stats.
    """
    B, N, D = z.shape
    guided = guidance.active
    zp = permute(z, block.flipped)
    if schedule.init == "z":
        xp = zp.clone()
    else:  # [z_0, 0, ..., 0]
        xp = torch.zeros_like(zp)
        xp[:, 0] = zp[:, 0]
    net = block if net is None else net
    net_dtype = next(net.parameters()).dtype
    cond_all = net.class_bias(guidance.labels(y, B, z.device))  # (B', 1, Ch) or scalar
    qs_all = guidance.q_scale(B, z.device, net_dtype)
    cache = net.new_cache(B * (2 if guided else 1), dtype=net_dtype, device=z.device)
    edges = schedule.boundaries(N)
    stats = BlockStats(block.index, len(edges) - 1,
                       sample_iters=torch.zeros(B, dtype=torch.long, device=z.device),
                       residual=torch.zeros(B, dtype=torch.float32, device=z.device))
    healthy = torch.ones(B, dtype=torch.bool, device=z.device)
    tol, every = schedule.tol, schedule.check_every

    def pick(t, rows):
        return t if not isinstance(t, torch.Tensor) or t.dim() == 0 else t[rows]

    for seg, (s, e) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        p = max(s, 1)  # position 0 is the identity and never needs solving
        if p >= e:
            continue
        L = e - p
        cap = L if schedule.max_iters is None else min(schedule.max_iters, L)
        positions = torch.arange(p, e, device=z.device)
        rows = healthy.nonzero().squeeze(1)  # (Ba,) samples still being solved here
        if rows.numel() == 0:
            break
        full = rows.numel() == B
        work = cache if full else cache.select(_net_rows(rows, B, guided), end=p - 1)
        nrows = _net_rows(rows, B, guided)
        cond = cond_all if full else pick(cond_all, nrows)
        qs = qs_all if full or qs_all is None else qs_all[nrows]
        seg_x = xp[rows, p - 1:e].clone()  # (Ba, L + 1, D): fed tokens plus the last position
        seg_z = zp[rows, p:e]  # (Ba, L, D)
        ran = 0
        front = 0  # positions [p, p + front) are frozen: never fed or updated again
        for k in range(cap):
            # Jacobi step on the segment's unfrozen part: tokens [p - 1 + front, e - 1) are fed,
            # attending to the cached K/V of everything before them.
            fed = guidance.expand(seg_x[:, front:-1]).to(net_dtype)
            out = net.predict(fed, cond=cond, start=p - 1 + front, cache=work,
                              q_scale=qs).to(z.dtype)  # (Ba', L - front, 2D)
            out = guidance.combine(out, positions[front:], N)  # (Ba, L - front, 2D)
            new = torch.addcmul(out[..., D:], seg_z[:, front:], exp32(out[..., :D]))
            tail = seg_x[:, front + 1:]  # (Ba, L - front, D) a view: the positions updated
            ran = k + 1
            # After k + 1 iterations the first k + 1 positions are final (the system is
            # triangular), so the frontier advances by one without any test.
            last = ran == cap or front + 1 >= L
            test = last or (tol > 0 and ran % every == 0)
            if not (test or callback is not None):
                tail.copy_(new)
                front += 1
                continue
            delta = new - tail
            tail.copy_(new)
            if not test:  # traced but untested iteration
                front += 1
                callback({"block": block.index, "segment": seg, "iteration": ran,
                          "residual": None, "active": rows.numel()})
                continue
            # Relative residual over the whole segment (frozen positions contribute no change).
            # With ``freeze``, every further leading position whose change is within tol for
            # all active samples stops too (exact at tol = 0: an unchanged prefix is a fixed
            # point, hence the solution).
            res, done, lead, any_done = convergence_test(delta, seg_x[:, 1:], tol,
                                                         schedule.freeze)
            front = min(front + max(1, lead), L)
            last = last or front == L
            if callback is not None:
                callback({"block": block.index, "segment": seg, "iteration": ran,
                          "residual": res.float(), "active": rows.numel()})
            if not (last or any_done):
                continue
            # Retire converged (and broken) samples: results and cache rows go back.
            leave = torch.ones_like(done) if last else done
            gone = rows[leave]
            xp[gone, p:e] = seg_x[leave, 1:]
            stats.sample_iters[gone] += ran
            stats.residual[gone] = torch.maximum(stats.residual[gone], res[leave].float())
            finite = torch.isfinite(res)
            if not bool(finite.all()):
                healthy[rows[~finite]] = False
            if work is not cache:
                local = _net_rows(leave.nonzero().squeeze(1), rows.numel(), guided)
                cache.put(_net_rows(gone, B, guided), _slice(work, local), p - 1, e - 1)
            if last or bool(leave.all()):
                break
            stay = ~leave
            if work is cache:  # first retirement: move the survivors to a compact cache
                work = cache.select(_net_rows(rows[stay], B, guided), end=p - 1 + front)
            else:
                work = _slice(work, _net_rows(stay.nonzero().squeeze(1), rows.numel(), guided))
            rows = rows[stay]
            seg_x, seg_z = seg_x[stay], seg_z[stay]
            nrows = _net_rows(rows, B, guided)
            cond = pick(cond_all, nrows)
            qs = None if qs_all is None else qs_all[nrows]
        stats.iters.append(ran)

    x = permute(xp, block.flipped)
    bad = (~healthy).nonzero().squeeze(1)
    if bad.numel():
        stats.fallback = int(bad.numel())
        warnings.warn(f"GS-Jacobi iterates of block {block.index} went non-finite for "
                      f"{bad.numel()} of {B} samples; re-solving those with the sequential loop",
                      RuntimeWarning, stacklevel=2)
        x[bad] = block.reverse(z[bad], None if y is None else y[bad], guidance=guidance)
        if not bool(torch.isfinite(x[bad]).all()):
            warnings.warn(f"the sequential inverse of block {block.index} is non-finite too: the "
                          f"model itself overflows on these samples (not a solver problem)",
                          RuntimeWarning, stacklevel=2)
    return x, stats


def _slice(cache: KVCache, rows: torch.Tensor) -> KVCache:
    """Rows of a cache, every slot (a compaction of an already compact cache)."""
    return KVCache(cache.k[:, rows], cache.v[:, rows])
