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

Steps, in :func:`gs_jacobi_block`'s order: ``_initial_guess``, then per segment ``_solve_segment``
(``_segment_rows``; per iteration ``_jacobi_sweep``, ``convergence_test`` and ``_retire``, which
writes converged samples back and compacts the KV cache), then ``_resolve_sequentially``.
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
from tarflow.sampling.convergence import convergence_test, done_mask, non_finite_rows
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


def _net_rows(rows: torch.Tensor, batch: int, guided: bool) -> torch.Tensor:
    """Network-batch rows of sample rows: the cond rows, then their uncond twins at + B."""
    return torch.cat([rows, rows + batch]) if guided else rows


@dataclass
class _Block:
    """What every step of one block's solve shares. ``xp`` is the iterate, updated in place."""

    block: FlowBlock
    net: FlowBlock  # runs the network passes (``block`` or a lower-precision copy)
    net_dtype: torch.dtype
    guidance: Guidance
    zp: torch.Tensor  # (B, N, D) the block's sampling input in its token order
    xp: torch.Tensor  # (B, N, D) the iterate, same order
    cache: KVCache | None  # None: cacheless, full causal passes
    cond: torch.Tensor | float  # class bias of every network row (B', 1, Ch), or a scalar
    qs: torch.Tensor | None  # attention q-scale of every network row
    tol: float
    every: int  # test convergence every k-th iteration
    step: int  # the frontier's advance per iteration (0: nothing is frozen)
    callback: TraceFn | None
    stats: BlockStats
    broken: list[int] = field(default_factory=list)  # samples whose iterates went non-finite


@dataclass
class _Rows:
    """The samples being solved in one segment [p, e), L = e - p, and their network state."""

    ids: torch.Tensor  # (Ba,) sample ids
    x: torch.Tensor  # (Ba, L + 1, D) fed tokens plus the last position; a view of xp if in_place
    z: torch.Tensor  # (Ba, L, D)
    cache: KVCache | None  # the K/V these rows attend to (the block's cache, or a compact copy)
    cond: torch.Tensor | float
    qs: torch.Tensor | None
    in_place: bool  # all B samples, as views of xp (nothing to gather or write back)


def _gathered(b: _Block, ids: torch.Tensor, x: torch.Tensor, z: torch.Tensor,
              cache: KVCache | None) -> _Rows:
    """Samples ``ids`` held in copies (written back when they retire), with their network rows'
    class bias and q-scale."""
    nrows = _net_rows(ids, b.zp.shape[0], b.guidance.active)
    cond = b.cond if not isinstance(b.cond, torch.Tensor) or b.cond.dim() == 0 else b.cond[nrows]
    return _Rows(ids, x, z, cache, cond, None if b.qs is None else b.qs[nrows], in_place=False)


def _initial_guess(zp: torch.Tensor, init: str, guess: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """X^(0): the block's input itself, [z_0, 0, ..., 0] (``init="zeros"``), or ``guess``
    (``init="student"``: the solution a student predicts, in the block's order) with the exact
    position 0 (x_0 = z_0: the first token is the identity)."""
    if init == "z":
        return zp.clone()
    if init == "student":
        if guess is None:
            raise ValueError("init 'student' needs the student's guess: sample(..., "
                             "student=<a distilled student or its checkpoint>)")
        xp = guess.to(zp.dtype).clone()
    else:
        xp = torch.zeros_like(zp)
    xp[:, 0] = zp[:, 0]
    return xp


def _segment_rows(b: _Block, p: int, e: int) -> _Rows | None:
    """All samples as views of xp (the common case), or the healthy ones gathered into copies
    (None when none is left)."""
    B = b.zp.shape[0]
    if not b.broken:
        return _Rows(torch.arange(B, device=b.zp.device), b.xp[:, p - 1:e], b.zp[:, p:e],
                     b.cache, b.cond, b.qs, in_place=True)
    keep = torch.ones(B, dtype=torch.bool, device=b.zp.device)
    keep[b.broken] = False
    ids = keep.nonzero().squeeze(1)  # (Ba,) samples still being solved here
    if ids.numel() == 0:
        return None
    cache = (None if b.cache is None
             else b.cache.select(_net_rows(ids, B, b.guidance.active), end=p - 1))
    return _gathered(b, ids, b.xp[ids, p - 1:e], b.zp[ids, p:e], cache)  # (advanced indexing)


def _jacobi_sweep(b: _Block, r: _Rows, src: torch.Tensor, start: int, keep: slice,
                  pos: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
    """One Jacobi update X' = z * exp(a(X)) + b(X) of the positions ``pos`` from the fed
    tokens ``src`` (Ba, j1 - j0, D), which start at sequence position ``start``."""
    fed = b.guidance.expand(src)
    cast = b.net_dtype != b.zp.dtype
    out = b.net.predict(fed.to(b.net_dtype) if cast else fed, cond=r.cond, start=start,
                        cache=r.cache, q_scale=r.qs)  # (Ba', j1 - j0, 2D)
    out = out[:, keep]  # (Ba', L - front, 2D): the unfrozen positions
    sigma, mu = b.guidance.scale_shift(out.to(b.zp.dtype) if cast else out, pos,
                                       b.zp.shape[1], b.block.sigma)  # (Ba, L - front, D) each
    return torch.addcmul(mu, zs, sigma)


def _retire(b: _Block, r: _Rows, res: torch.Tensor, ran: int, p: int, e: int, front: int, *,
            last: bool, any_done: bool) -> _Rows | None:
    """Retire converged (and broken) samples: results, counts and cache rows go back. Returns
    the survivors in a compact cache, or None when the segment is finished."""
    B, guided = b.zp.shape[0], b.guidance.active
    if last and r.in_place:  # every sample finishes here, already in xp
        b.stats.sample_iters += ran
        torch.maximum(b.stats.residual, res.float(), out=b.stats.residual)
        b.broken += non_finite_rows(res, r.ids) if any_done else []
        return None
    done = done_mask(res, b.tol)
    leave = torch.ones_like(done) if last else done
    gone = r.ids[leave]
    if not r.in_place:
        b.xp[gone, p:e] = r.x[leave, 1:]
    b.stats.sample_iters[gone] += ran
    b.stats.residual[gone] = torch.maximum(b.stats.residual[gone], res[leave].float())
    b.broken += non_finite_rows(res, r.ids) if any_done else []
    if b.cache is not None and r.cache is not b.cache:
        local = _net_rows(leave.nonzero().squeeze(1), r.ids.numel(), guided)
        b.cache.put(_net_rows(gone, B, guided), _slice(r.cache, local), p - 1, e - 1)
    if last or bool(leave.all()):
        return None
    # KV-cache compaction: the survivors' rows move to a cache of their own.
    stay = ~leave
    ids = r.ids[stay]
    cache = r.cache
    if b.cache is not None:
        cache = (b.cache.select(_net_rows(ids, B, guided), end=p - 1 + front)
                 if r.cache is b.cache
                 else _slice(r.cache, _net_rows(stay.nonzero().squeeze(1), r.ids.numel(), guided)))
    return _gathered(b, ids, r.x[stay], r.z[stay], cache)


def _solve_segment(b: _Block, seg: int, p: int, e: int, cap: int) -> int | None:
    """Jacobi iterations on positions [p, e) until every sample is retired; returns how many
    ran (None: no healthy sample is left to solve)."""
    r = _segment_rows(b, p, e)
    if r is None:
        return None
    L = e - p
    positions = torch.arange(p, e, device=b.zp.device)
    ran = 0
    front = 0  # positions [p, p + front) are frozen: never fed or updated again
    views = None  # slices for the current frontier and rows, rebuilt when either moves
    for k in range(cap):
        if views is None or views[0] != front:
            # Tokens [p - 1 + front, e - 1) must be fed, attending to the cached K/V of
            # everything before them; the window is padded to a multiple of 8 tokens (see
            # _window), whose extra outputs are dropped.
            j0, j1 = _window(L, front)
            views = (front, j0, r.x[:, j0:j1], positions[front:], r.z[:, front:],
                     r.x[:, front + 1:])
        _, j0, src, pos, zs, tail = views  # tail: (Ba, L - front, D), the updated positions
        new = _jacobi_sweep(b, r, src, p - 1 + j0, slice(front - j0, L - j0), pos, zs)
        ran = k + 1
        # After k + 1 iterations the first k + 1 positions are final (the system is
        # triangular), so the frontier advances by one without any test.
        last = ran == cap or front + 1 >= L
        test = last or (b.tol > 0 and ran % b.every == 0)
        if not (test or b.callback is not None):
            tail.copy_(new)
            front += b.step
            continue
        delta = new - tail
        tail.copy_(new)
        trace = {"block": b.block.index, "segment": seg, "iteration": ran, "residual": None,
                 "active": r.ids.numel()}
        if not test:  # traced but untested iteration
            front += b.step
            b.callback(trace)
            continue
        # Relative residual over the whole segment (frozen positions contribute no change).
        # With ``freeze``, every further leading position whose change is within tol for
        # all active samples stops too (exact at tol = 0: an unchanged prefix is a fixed
        # point, hence the solution).
        res, lead, any_done = convergence_test(delta, r.x[:, 1:], b.tol, b.step > 0)
        front = min(front + max(b.step, lead), L)
        last = last or front == L
        if b.callback is not None:
            b.callback({**trace, "residual": res.float()})
        if last or any_done:
            r = _retire(b, r, res, ran, p, e, front, last=last, any_done=any_done)
            if r is None:
                break
            views = None
    return ran


@torch.no_grad()
def gs_jacobi_block(block: FlowBlock, z: torch.Tensor, y: torch.Tensor | None,
                    schedule: BlockSchedule, *, guidance: Guidance = Guidance(),
                    callback: TraceFn | None = None, net: FlowBlock | None = None,
                    guess: torch.Tensor | None = None) -> tuple[torch.Tensor, BlockStats]:
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
        guess: (B, N, D) raster order, the block's input a student predicts: the initial
            guess of ``schedule.init == "student"`` (``tarflow.sampling.student``).

    Returns:
        x (B, N, D) raster order, and the block's stats.
    """
    B, N, D = z.shape
    guidance = block.guided(guidance)
    net = block if net is None else net
    net_dtype = next(net.parameters()).dtype
    edges = schedule.boundaries(N)
    # A single segment fed whole every iteration needs no K/V cache: full causal passes, as in
    # the reference loop. That is what freeze=False asks for, and what freezing comes down to
    # at tol = 0 with a cap under half the sequence: only the exact frontier can freeze then,
    # saving about cap / 2N of the tokens, less than the cache costs (on the 2-core CPU: 9% of
    # a pass at batch 1, 3% at batch 16).
    cap_all = N - 1 if schedule.max_iters is None else schedule.max_iters
    cacheless = len(edges) == 2 and (not schedule.freeze
                                     or (schedule.tol == 0 and cap_all < (N - 1) // 2))
    zp = permute(z, block.flipped)  # (B, N, D) in the block's token order
    b = _Block(
        block, net, net_dtype, guidance, zp,
        _initial_guess(zp, schedule.init, None if guess is None else permute(guess, block.flipped)),
        cache=None if cacheless else net.new_cache(B * (2 if guidance.active else 1),
                                                   dtype=net_dtype, device=z.device),
        cond=net.class_bias(guidance.labels(y, B, z.device)),  # (B', 1, Ch) or scalar
        qs=guidance.q_scale(B, z.device, net_dtype), tol=schedule.tol,
        every=schedule.check_every, step=0 if cacheless else int(schedule.freeze),
        callback=callback,
        stats=BlockStats(block.index, len(edges) - 1,
                         sample_iters=torch.zeros(B, dtype=torch.long, device=z.device),
                         residual=torch.zeros(B, dtype=torch.float32, device=z.device)))
    # The segment loop: segments are solved in order, each attending to the ones before.
    for seg, (s, e) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        p = max(s, 1)  # position 0 is the identity and never needs solving
        if p >= e:
            continue
        cap = e - p if schedule.max_iters is None else min(schedule.max_iters, e - p)
        ran = _solve_segment(b, seg, p, e, cap)
        if ran is None:  # every sample went non-finite
            break
        b.stats.iters.append(ran)
    x = permute(b.xp, block.flipped)
    if b.broken:
        _resolve_sequentially(block, z, y, x, b, guidance)
    return x, b.stats


def _resolve_sequentially(block: FlowBlock, z: torch.Tensor, y: torch.Tensor | None,
                          x: torch.Tensor, b: _Block, guidance: Guidance) -> None:
    """The overflow guard: samples whose iterates went non-finite are solved again, in ``x``,
    by the exact sequential loop."""
    bad = torch.tensor(sorted(b.broken), device=z.device)
    b.stats.fallback = len(b.broken)
    warnings.warn(f"GS-Jacobi iterates of block {block.index} went non-finite for "
                  f"{len(b.broken)} of {z.shape[0]} samples; re-solving those with the "
                  f"sequential loop", RuntimeWarning, stacklevel=3)
    x[bad] = block.reverse(z[bad], None if y is None else y[bad], guidance=guidance)
    if not bool(torch.isfinite(x[bad]).all()):
        warnings.warn(f"the sequential inverse of block {block.index} is non-finite too: the "
                      f"model itself overflows on these samples (not a solver problem)",
                      RuntimeWarning, stacklevel=3)


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
