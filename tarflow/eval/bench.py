"""Side-by-side sampler timing: same weights, noise, labels and batch, in one process.

Rules (docs/benchmarks.md): warm-up first, medians over repeats, no FID or I/O inside timed regions,
errors measured against the sequential loop's images on the same noise.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from tarflow.model import TarFlow
from tarflow.sampling import SamplingSchedule, sample
from tarflow.sampling.knobs import GUIDANCE_KNOBS


@dataclass(frozen=True)
class Method:
    """A sampler to time: a schedule, optionally a low-precision network for its Jacobi
    iterations (``sample(..., net_dtype=...)``), or the plain fixed-iteration Jacobi loop; a
    distilled ``student`` alone (``steps`` K), or as the initial guess of blocks whose schedule
    says ``init="student"``.

    ``plan`` marks methods whose schedule the planner decides per batch size before timing
    (``net_dtype`` is then the dtype it may use). ``net``, when
    set, is the network the method runs instead of the benchmark's (e.g. :func:`compiled_copy`).
    """

    schedule: SamplingSchedule
    net_dtype: str | None = None
    plan: bool = False
    plain_iters: int | None = None
    net: TarFlow | None = field(default=None, compare=False, repr=False)
    student: torch.nn.Module | None = field(default=None, compare=False, repr=False)
    steps: int | None = None  # with ``student`` and no schedule: the student alone, K steps

    def describe(self) -> str:
        if self.student is not None and self.steps is not None:
            return f"student, {self.steps} Euler step(s)"
        if self.plain_iters is not None:
            return f"plain loop, {self.plain_iters} full passes per block, no test"
        applied = self.net_dtype and not self.plan  # a planned schedule names its own dtypes
        return self.schedule.describe() + (f" @{self.net_dtype}" if applied else "")

    def run(self, model: TarFlow, noise: torch.Tensor, y: torch.Tensor | None, **knobs):
        if self.student is not None and self.steps is not None:  # the student alone
            return sample(self.student, noise, y, steps=self.steps)
        model = self.net if self.net is not None else model
        if self.plain_iters is not None:
            from tarflow.eval.baseline import sample_jacobi_plain

            g = {k: knobs[k] for k in GUIDANCE_KNOBS if k in knobs}
            init = self.schedule.default.init
            return sample_jacobi_plain(model, noise, y, iters=self.plain_iters, init=init,
                                       **g), None
        dtype = None if self.plan else self.net_dtype
        extra = {} if self.student is None else {"student": self.student}
        return sample(model, noise, y, self.schedule, net_dtype=dtype, **extra, **knobs)


def compiled_copy(model: TarFlow, **options) -> TarFlow:
    """A copy of ``model`` whose blocks run ``predict`` through ``torch.compile``.

    ``predict`` is the one network call every sampler makes: one token with the KV cache in the
    sequential loop, a run of tokens from the convergence frontier in a Jacobi iteration (its
    length, start and batch change from call to call, hence ``dynamic=True`` unless ``options``
    say otherwise). A copy, so that eager and compiled can be timed side by side on one set of
    weights; the copy shares nothing with ``model``.
    """
    other = copy.deepcopy(model)
    for block in other.blocks:
        block.predict = torch.compile(block.predict, **{"dynamic": True, **options})
    return other


@dataclass
class BenchRow:
    """One method's result at one batch size."""

    method: str
    schedule: str
    batch: int
    seconds: float  # median wall time of one call
    seconds_per_image: float
    speedup: float  # sequential seconds / these seconds
    vs_forward: float  # these seconds / one likelihood (forward) pass on the same batch
    max_abs_err: float
    rel_err: float  # ||x - x_seq|| / ||x_seq||
    iters: dict[int, int] = field(default_factory=dict)
    peak_mem_mb: float | None = None
    fid: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    fn: Callable[[], object], *, repeats: int, warmup: int, device: torch.device
) -> tuple[float, object]:
    """Median seconds of ``fn`` over ``repeats`` back-to-back calls after ``warmup`` calls.

    Garbage is collected once before the timed calls and the collector is paused during them,
    as ``timeit`` does. Collecting before every call (as this function once did) leaves caches
    and the OpenMP workers cold: on the 2-core CPU it added ~2 ms to every call (one forward pass
    of the demo model: 4.5 ms instead of 2.7 ms), which understated "x fwd" and the speed-ups.

    Returns:
        (median seconds, the last call's result).
    """
    out = None
    for _ in range(warmup):
        out = fn()
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    finally:
        if was_enabled:
            gc.enable()
    return statistics.median(times), out


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one call above what was allocated before it, in MiB.

    CUDA: the caching allocator's peak statistics. CPU: PyTorch keeps no allocator statistics
    there, so the call runs under ``torch.profiler`` with memory profiling and the peak is taken
    over the running sum of every op's net allocation (op granularity: a temporary allocated and
    freed inside one kernel is not seen). Run outside timed regions (the profiler is slow).
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
    live = peak = 0
    for _, d in deltas:
        live += d
        peak = max(peak, live)
    return peak / 2**20


@torch.no_grad()
def benchmark(
    model: TarFlow,
    noise: torch.Tensor,
    y: torch.Tensor | None,
    methods: dict[str, SamplingSchedule | Method],
    *,
    repeats: int = 5,
    warmup: int = 1,
    concat_baseline: bool = False,
    progress: Callable[[str], None] | None = None,
    **knobs,
) -> list[BenchRow]:
    """Time the sequential loop and every method on the same inputs.

    Args:
        methods: name -> schedule or :class:`Method`; "sequential" is added first if missing (it
            is the reference).
        concat_baseline: also time the sequential loop with the reference code's ``torch.cat``
            cache (row "sequential_cat"; its speed-up < 1 is how much faster our loop is).
        knobs: guidance, attn_temp, annealed, denoise (passed to ``sample``).

    Returns:
        Rows in the order run, sequential first.
    """
    device = noise.device
    B = noise.shape[0]
    methods = {name: m if isinstance(m, Method) else Method(m)
               for name, m in {"sequential": SamplingSchedule.sequential(), **methods}.items()}
    calls: dict[str, Callable[[], object]] = {
        "forward": lambda: model(model.unpatchify(noise), y)}
    for name, method in methods.items():
        calls[name] = lambda m=method: m.run(model, noise, y, **knobs)[0]
    if concat_baseline:
        from tarflow.eval.baseline import sample_sequential_concat

        g = {k: knobs[k] for k in GUIDANCE_KNOBS if k in knobs}
        calls["sequential_cat"] = lambda: sample_sequential_concat(model, noise, y, **g)
    if progress:
        progress(f"batch {B}: timing {', '.join(calls)} in {repeats} interleaved rounds")
    secs, images = interleaved_medians(calls, repeats=repeats, warmup=warmup, device=device)
    ref = images["sequential"].double()
    t_seq, t_fwd = secs["sequential"], secs["forward"]
    rows: list[BenchRow] = []
    for name in [n for n in calls if n != "forward"]:
        method = methods.get(name)
        stats = method.run(model, noise, y, **knobs)[1] if method else None
        diff = images[name].double() - ref
        rows.append(BenchRow(
            method=name,
            schedule=method.describe() if method else "sequential, torch.cat cache",
            batch=B, seconds=secs[name], seconds_per_image=secs[name] / B,
            speedup=t_seq / secs[name], vs_forward=secs[name] / t_fwd,
            max_abs_err=float(diff.abs().max()),
            rel_err=float(diff.norm() / ref.norm().clamp_min(1e-30)),
            iters=stats.iters if stats else (
                {b: method.plain_iters for b in range(model.config.num_blocks)}
                if method else rows[0].iters),
            peak_mem_mb=peak_memory_mb(calls[name], device)))
    if concat_baseline:  # show it next to the loop it is the baseline of
        rows.insert(1, rows.pop())
    return rows


def interleaved_medians(calls: dict[str, Callable[[], object]], *, repeats: int, warmup: int,
                        device: torch.device) -> tuple[dict[str, float], dict[str, object]]:
    """Median seconds of each call, timed round-robin: one call of each per round.

    Round-robin rather than all repeats of one method then the next, so that a slow phase of
    the machine (other tenants of a VM, frequency changes) hits every method alike; between
    processes and phases the same call varied by up to 30% on the 2-core VM. The order rotates
    by one each round: the call right after the sequential loop ran ~2% slower at batch 1 on
    the 2-core CPU (caches), which a fixed order charged to one method only.

    Returns:
        ({name: median seconds}, {name: last result}).
    """
    last: dict[str, object] = {}
    for _ in range(warmup):
        for name, fn in calls.items():
            last[name] = fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()  # back-to-back calls, as in median_time
    try:
        names = list(calls)
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                fn = calls[name]
                _sync(device)
                t0 = time.perf_counter()
                last[name] = fn()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    finally:
        if was_enabled:
            gc.enable()
    return {name: statistics.median(t) for name, t in times.items()}, last


def format_table(rows: list[BenchRow]) -> str:
    """Markdown table of benchmark rows."""
    has_fid = any(r.fid is not None for r in rows)
    has_mem = any(r.peak_mem_mb is not None for r in rows)
    head = ["method", "schedule", "batch", "s/img", "speed-up", "x fwd", "max|err|", "rel err"]
    head += (
        (["FID"] if has_fid else []) + (["peak MB"] if has_mem else []) + ["iters, block T-1..0"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.method,
            f"`{r.schedule}`",
            str(r.batch),
            f"{r.seconds_per_image:.4f}",
            f"{r.speedup:.2f}x",
            f"{r.vs_forward:.1f}",
            f"{r.max_abs_err:.2e}",
            f"{r.rel_err:.2e}",
        ]
        if has_fid:
            cells.append("" if r.fid is None else f"{r.fid:.2f}")
        if has_mem:
            cells.append("" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.0f}")
        cells.append(" ".join(str(n) for _, n in sorted(r.iters.items(), reverse=True)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
