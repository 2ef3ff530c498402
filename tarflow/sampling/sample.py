"""Sampling TarFlow: run the blocks in reverse, each with its own schedule, each through the one
per-block seam :func:`tarflow.sampling.solve.solve_block`.

``sample`` is the one entry point; ``sample_sequential``, ``sample_jacobi`` and
``sample_gs_jacobi`` are thin named forms of it that return images only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from tarflow.model import Guidance, TarFlow
from tarflow.model.student import Student, is_student
from tarflow.sampling.convergence import relative_residual
from tarflow.sampling.denoise import self_denoise
from tarflow.sampling.jacobi import BlockStats, TraceFn
from tarflow.sampling.knobs import knobs_of
from tarflow.sampling.precision import dtype_name
from tarflow.sampling.schedule import SamplingSchedule
from tarflow.sampling.solve import NetworkCopies, solve_block
from tarflow.sampling.student import resolve_student, sample_student, student_guesses


@dataclass
class SampleStats:
    """Per-block stats keyed by forward block id, plus the total wall time."""

    blocks: dict[int, BlockStats] = field(default_factory=dict)
    seconds: float = 0.0
    schedule: str = ""

    @property
    def iters(self) -> dict[int, int]:
        """Network passes on the critical path per block (sequential: N - 1)."""
        return {b: s.total_iters for b, s in sorted(self.blocks.items())}

    @property
    def fallback(self) -> int:
        return sum(s.fallback for s in self.blocks.values())

    def summary(self) -> str:
        parts = " ".join(f"b{b}:{n}" for b, n in self.iters.items())
        return f"{self.schedule} {self.seconds:.3f}s iters[{parts}]"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def sample(model: TarFlow, noise: torch.Tensor, y: torch.Tensor | None = None,
           schedule: SamplingSchedule | None = None, *, guidance: float = 0.0,
           attn_temp: float = 1.0, annealed: bool = False, guidance_rule: str = "linear",
           denoise: float = 0.0, noise_std: float | None = None,
           check_every: int | None = None, callback: TraceFn | None = None,
           net_dtype: torch.dtype | str | None = None,
           guesses: Mapping[int, torch.Tensor] | None = None, steps: int | None = None,
           student: Student | str | None = None) -> tuple[torch.Tensor, SampleStats]:
    """Noise -> images.

    Args:
        model: a TarFlow (in eval mode; its parameters decide the dtype to use for ``noise``).
        noise: (B, N, D) prior noise (``model.sample_noise``).
        y: (B,) labels of a conditional model, or None (null class).
        schedule: per-block settings; None = the exact sequential loop.
        guidance: CFG weight w (0 = off).
        attn_temp: attention temperature of the uncond branch.
        annealed: ramp w linearly along each block's sequence.
        guidance_rule: "linear" (TarFlow: on a and b) or "starflow" (the Gaussian proportional
            to p_c^(1+w) p_u^(-w)); see ``tarflow.model.guidance``.
        denoise: self-denoising multiplier (0 = off); needs ``noise_std`` or the config's.
        check_every: shorthand that sets every block's ``check_every`` (convergence test every
            k Jacobi iterations); None keeps the schedule's.
        callback: per-iteration trace (see ``gs_jacobi_block``).
        net_dtype: shorthand that sets every block's ``net_dtype``: run the network of Jacobi /
            GS-Jacobi iterations in this dtype (e.g. "bfloat16"; a cached converted copy of the
            model) while iterates, updates and the stopping test stay in the noise dtype.
            Sequential blocks keep full precision. None keeps the schedule's.
        guesses: per forward block id, a (B, N, D) initial guess of that block's solution in
            raster order (e.g. a learned prediction pushed through the forward pass), used
            instead of the schedule's ``init`` by Jacobi / GS-Jacobi blocks (sequential blocks
            ignore it). Every block goes through :func:`tarflow.sampling.solve.solve_block`.
        steps: Euler steps K of a distilled student (``tarflow.model.student``), which
            ``model`` may be: it samples in K steps and ignores the schedule and guidance (fixed
            when distilled). For a TarFlow with ``student``: the student's steps.
        student: a distilled student of ``model`` (or its checkpoint's path): blocks whose
            schedule says ``init="student"`` start their Jacobi iteration from its sample
            pushed through ``model``'s forward pass (its cost is in the time). The samples are
            the same as with any other guess, to the tolerance.

    Returns:
        images (B, C, H, W) and :class:`SampleStats`.
    """
    if is_student(model):  # a distilled student: K Euler steps, no blocks to solve
        _sync(noise.device)
        t0 = time.perf_counter()
        images = sample_student(model, noise, y, steps=steps, denoise=denoise)
        _sync(noise.device)
        K = int(steps or model.student_config.steps)
        return images, SampleStats(seconds=time.perf_counter() - t0, schedule=f"student K={K}")
    if steps is not None and student is None:
        raise ValueError(f"steps={steps} is a distilled student's setting; this checkpoint is "
                         f"a TarFlow (its sampler is set by the schedule)")
    cfg = model.config
    schedule = schedule or SamplingSchedule.sequential()
    if check_every is not None:
        schedule = schedule.with_settings(check_every=int(check_every))
    if net_dtype is not None:
        name = dtype_name(net_dtype)
        schedule = schedule.with_settings(net_dtype=None if name == dtype_name(noise.dtype)
                                          else name)
    schedule.validate(cfg.num_blocks, cfg.num_patches)
    model._check_labels(y)
    g = Guidance(guidance, attn_temp, annealed, guidance_rule)
    g.check(cfg.conditional)
    if noise.shape[1:] != (cfg.num_patches, cfg.token_dim):
        raise ValueError(f"noise must be (B, {cfg.num_patches}, {cfg.token_dim}) for "
                         f"{cfg.tag}, got {tuple(noise.shape)}")
    guesses = dict(guesses or {})
    unknown = sorted(set(guesses) - set(range(cfg.num_blocks)))
    if unknown:
        raise ValueError(f"guesses for unknown block(s) {unknown}; the model has blocks "
                         f"0..{cfg.num_blocks - 1}")
    stats = SampleStats(schedule=schedule.describe())
    twins = NetworkCopies(model)  # low-precision copies used by this call, made once
    _sync(noise.device)
    t_all = time.perf_counter()
    learned = [b for b in range(cfg.num_blocks) if schedule.for_block(b).init == "student"]
    if learned:
        teacher_student = resolve_student(student, noise)
        if teacher_student is None:
            raise ValueError("the schedule starts some block from init 'student', but no "
                             "student was given (sample(..., student=...), sampler.student)")
        from_student = student_guesses(model, teacher_student, noise, y, g, steps=steps)
        for b in learned:  # a caller's own guess for a block wins over the student's
            guesses.setdefault(b, from_student[b])
    x = noise
    for block in reversed(model.blocks):
        t0 = time.perf_counter()
        x, st = solve_block(block, x, y, schedule.for_block(block.index), guidance=g,
                            nets=twins, guess=guesses.get(block.index), callback=callback)
        _sync(noise.device)
        st.seconds = time.perf_counter() - t0
        stats.blocks[block.index] = st
    images = model.unpatchify(x)
    if denoise:
        sigma = cfg.noise_std if noise_std is None else noise_std
        images = self_denoise(model, images, y, noise_std=sigma, multiplier=denoise)
    _sync(noise.device)
    stats.seconds = time.perf_counter() - t_all
    return images, stats


def sample_sequential(model: TarFlow, noise: torch.Tensor, y: torch.Tensor | None = None,
                      **knobs) -> torch.Tensor:
    """The exact reference: T * (N - 1) single-token steps with a preallocated KV cache."""
    return sample(model, noise, y, SamplingSchedule.sequential(), **knobs)[0]


def sample_jacobi(model: TarFlow, noise: torch.Tensor, y: torch.Tensor | None = None, *,
                  max_iters: int | None = None, init: str = "z", tol: float = 0.0,
                  **knobs) -> torch.Tensor:
    """Pure Jacobi (S = 1) in every block."""
    schedule = SamplingSchedule.jacobi(max_iters, init=init, tol=tol)
    return sample(model, noise, y, schedule, **knobs)[0]


def sample_gs_jacobi(model: TarFlow, noise: torch.Tensor, y: torch.Tensor | None,
                     schedule: SamplingSchedule, **knobs) -> torch.Tensor:
    """GS-Jacobi with a per-block schedule."""
    return sample(model, noise, y, schedule, **knobs)[0]


@torch.no_grad()
def precision_errors(model: TarFlow, noise: torch.Tensor, y: torch.Tensor | None,
                     schedule: SamplingSchedule, guidance: Guidance, *,
                     student: Student | None = None, steps: int | None = None
                     ) -> tuple[float, float]:
    """How far a low-precision network moves the samples, and how far the tolerance alone does.

    Both in the stopping test's metric, the largest per-sample mean((x - x_ref)^2) /
    mean(x_ref^2) over the batch. ``student`` (and its ``steps``): the guess of the blocks whose
    schedule says ``init="student"``.

    Returns:
        (``schedule``'s samples against the same schedule with every network in full
        precision, that full-precision schedule's samples against the sequential loop's).
    """
    knobs = knobs_of(guidance)
    if student is not None:
        knobs = {**knobs, "student": student, "steps": steps}
    low = sample(model, noise, y, schedule, **knobs)[0]
    full = sample(model, noise, y, schedule.with_settings(net_dtype=None), **knobs)[0]
    exact = sample(model, noise, y, None, **knobs)[0]  # the sequential loop: no guess used
    return (float(relative_residual(full, low).max()),
            float(relative_residual(exact, full).max()))
