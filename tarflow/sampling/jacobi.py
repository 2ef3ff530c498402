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
from tarflow.model.flow import FlowBlock
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


def _done(res: torch.Tensor, tol: float) -> torch.Tensor:
    """(B,) bool: converged, or non-finite (NaN compares False both ways)."""
    return ~((res > tol) & (res < float("inf")))


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
    guidance = block.guided(guidance)
    guided = guidance.active
    zp = permute(z, block.flipped)
    if schedule.init == "z":
        xp = zp.clone()
    else:  # [z_0, 0, ..., 0]
        xp = torch.zeros_like(zp)
        xp[:, 0] = zp[:, 0]
    net = block if net is None else net
    net_dtype = next(net.parameters()).dtype
    cast = net_dtype != z.dtype
    cond_all = net.class_bias(guidance.labels(y, B, z.device))  # (B', 1, Ch) or scalar
    qs_all = guidance.q_scale(B, z.device, net_dtype)
    edges = schedule.boundaries(N)
    # A single segment fed whole every iteration needs no K/V cache: full causal passes, as in
    # the reference loop. That is what freeze=False asks for, and what freezing comes down to
    # at tol = 0 with a cap under half the sequence: only the exact frontier can freeze then,
    # saving about cap / 2N of the tokens, less than the cache costs (on the 2-core CPU: 9% of
    # a pass at batch 1, 3% at batch 16).
    cap_all = N - 1 if schedule.max_iters is None else schedule.max_iters
    cacheless = len(edges) == 2 and (not schedule.freeze
                                     or (schedule.tol == 0 and cap_all < (N - 1) // 2))
    cache = None if cacheless else net.new_cache(B * (2 if guided else 1), dtype=net_dtype,
                                                 device=z.device)
    stats = BlockStats(block.index, len(edges) - 1,
                       sample_iters=torch.zeros(B, dtype=torch.long, device=z.device),
                       residual=torch.zeros(B, dtype=torch.float32, device=z.device))
    broken: list[int] = []  # samples whose iterates went non-finite
    tol, every = schedule.tol, schedule.check_every
    step = 0 if cacheless else int(schedule.freeze)  # the frontier's advance per iteration

    def pick(t, rows):
        return t if not isinstance(t, torch.Tensor) or t.dim() == 0 else t[rows]

    for seg, (s, e) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        p = max(s, 1)  # position 0 is the identity and never needs solving
        if p >= e:
            continue
        L = e - p
        cap = L if schedule.max_iters is None else min(schedule.max_iters, L)
        positions = torch.arange(p, e, device=z.device)
        # All samples, as a view of xp that the iterations update in place (the common case:
        # nothing to gather or write back), or the healthy ones gathered into a copy.
        in_place = not broken
        if in_place:
            rows = torch.arange(B, device=z.device)
            work, cond, qs = cache, cond_all, qs_all
            seg_x = xp[:, p - 1:e]  # (B, L + 1, D): fed tokens plus the last position
        else:
            keep = torch.ones(B, dtype=torch.bool, device=z.device)
            keep[broken] = False
            rows = keep.nonzero().squeeze(1)  # (Ba,) samples still being solved here
            if rows.numel() == 0:
                break
            nrows = _net_rows(rows, B, guided)
            work = cache if cacheless else cache.select(nrows, end=p - 1)
            cond, qs = pick(cond_all, nrows), None if qs_all is None else qs_all[nrows]
            seg_x = xp[rows, p - 1:e]  # a copy (advanced indexing)
        seg_z = zp[rows, p:e] if not in_place else zp[:, p:e]  # (Ba, L, D)
        ran = 0
        front = 0  # positions [p, p + front) are frozen: never fed or updated again
        views = None  # slices for the current frontier and rows, rebuilt when either moves
        for k in range(cap):
            if views is None or views[0] != front:
                # Tokens [p - 1 + front, e - 1) must be fed, attending to the cached K/V of
                # everything before them; the window is padded to a multiple of 8 tokens (see
                # _window), whose extra outputs are dropped.
                j0, j1 = _window(L, front)
                views = (front, j0, seg_x[:, j0:j1], positions[front:], seg_z[:, front:],
                         seg_x[:, front + 1:])
            _, j0, src, pos, zs, tail = views  # tail: (Ba, L - front, D), the updated positions
            # Jacobi step on the segment's unfrozen part.
            fed = guidance.expand(src)
            out = net.predict(fed.to(net_dtype) if cast else fed, cond=cond, start=p - 1 + j0,
                              cache=work, q_scale=qs)  # (Ba', j1 - j0, 2D)
            out = out[:, front - j0:L - j0]  # (Ba', L - front, 2D): the unfrozen positions
            sigma, mu = guidance.scale_shift(out.to(z.dtype) if cast else out, pos, N,
                                             block.sigma)  # (Ba, L - front, D) each
            new = torch.addcmul(mu, zs, sigma)
            ran = k + 1
            # After k + 1 iterations the first k + 1 positions are final (the system is
            # triangular), so the frontier advances by one without any test.
            last = ran == cap or front + 1 >= L
            test = last or (tol > 0 and ran % every == 0)
            if not (test or callback is not None):
                tail.copy_(new)
                front += step
                continue
            delta = new - tail
            tail.copy_(new)
            if not test:  # traced but untested iteration
                front += step
                callback({"block": block.index, "segment": seg, "iteration": ran,
                          "residual": None, "active": rows.numel()})
                continue
            # Relative residual over the whole segment (frozen positions contribute no change).
            # With ``freeze``, every further leading position whose change is within tol for
            # all active samples stops too (exact at tol = 0: an unchanged prefix is a fixed
            # point, hence the solution).
            res, lead, any_done = convergence_test(delta, seg_x[:, 1:], tol, step > 0)
            front = min(front + max(step, lead), L)
            last = last or front == L
            if callback is not None:
                callback({"block": block.index, "segment": seg, "iteration": ran,
                          "residual": res.float(), "active": rows.numel()})
            if not (last or any_done):
                continue
            # Retire converged (and broken) samples: results and cache rows go back.
            if last and in_place:  # every sample finishes here, already in xp
                stats.sample_iters += ran
                torch.maximum(stats.residual, res.float(), out=stats.residual)
                broken += _non_finite(res, rows) if any_done else []
                break
            done = _done(res, tol)
            leave = torch.ones_like(done) if last else done
            gone = rows[leave]
            if not in_place:
                xp[gone, p:e] = seg_x[leave, 1:]
            stats.sample_iters[gone] += ran
            stats.residual[gone] = torch.maximum(stats.residual[gone], res[leave].float())
            broken += _non_finite(res, rows) if any_done else []
            if not cacheless and work is not cache:
                local = _net_rows(leave.nonzero().squeeze(1), rows.numel(), guided)
                cache.put(_net_rows(gone, B, guided), _slice(work, local), p - 1, e - 1)
            if last or bool(leave.all()):
                break
            stay = ~leave
            if not cacheless:  # the survivors' rows move to a compact cache
                work = (cache.select(_net_rows(rows[stay], B, guided), end=p - 1 + front)
                        if work is cache else
                        _slice(work, _net_rows(stay.nonzero().squeeze(1), rows.numel(), guided)))
            rows = rows[stay]
            seg_x, seg_z = seg_x[stay], seg_z[stay]  # copies from now on: written back above
            in_place, views = False, None
            nrows = _net_rows(rows, B, guided)
            cond = pick(cond_all, nrows)
            qs = None if qs_all is None else qs_all[nrows]
        stats.iters.append(ran)

    x = permute(xp, block.flipped)
    if broken:
        bad = torch.tensor(sorted(broken), device=z.device)
        stats.fallback = len(broken)
        warnings.warn(f"GS-Jacobi iterates of block {block.index} went non-finite for "
                      f"{len(broken)} of {B} samples; re-solving those with the sequential loop",
                      RuntimeWarning, stacklevel=2)
        x[bad] = block.reverse(z[bad], None if y is None else y[bad], guidance=guidance)
        if not bool(torch.isfinite(x[bad]).all()):
            warnings.warn(f"the sequential inverse of block {block.index} is non-finite too: the "
                          f"model itself overflows on these samples (not a solver problem)",
                          RuntimeWarning, stacklevel=2)
    return x, stats


def _non_finite(res: torch.Tensor, rows: torch.Tensor) -> list[int]:
    """Sample ids among ``rows`` whose residual (hence iterate) is not finite."""
    bad = ~torch.isfinite(res)
    return rows[bad].tolist() if bool(bad.any()) else []


def _window(L: int, front: int, align: int = 8) -> tuple[int, int]:
    """Tokens [j0, j1) of a segment's inputs (index j is position p - 1 + j) to feed when
    tokens [front, L) must be. Padded to a multiple of ``align`` when that costs at most a
    sixteenth more tokens, with frozen tokens before the window (their inputs are final, so
    their K/V come out as cached) or the segment's last token after it (its output is unused).

    Matrix kernels run whole tiles: on the 2-core CPU a pass over 64 tokens took 7% less time
    than one over 63 at batch 1 and 4% less at batch 16, and the first segment's 64-token
    window (p = 1, e = N) also keeps the cache's key/value views contiguous.
    """
    need = L - front
    options = []
    for j1 in (L, L + 1):
        n = -(-(j1 - front) // align) * align  # rounded up to a multiple of align
        if j1 - n >= 0 and n - need <= max(1, need // 16):
            options.append((j1 - n, j1))
    return min(options, key=lambda w: w[1] - w[0]) if options else (front, L)


def _slice(cache: KVCache, rows: torch.Tensor) -> KVCache:
    """Rows of a cache, every slot (a compaction of an already compact cache)."""
    return KVCache(cache.k[:, rows], cache.v[:, rows])
