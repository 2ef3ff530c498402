"""Sampling with a distilled student (``tarflow.model.student``), and a student as the exact
sampler's initial guess.

:func:`sample_student`: K Euler steps, no schedule. :func:`student_guesses`: the student's sample
carried through the teacher's forward pass gives every block's input, where that block's Jacobi
iteration can start (``BlockSchedule.init == "student"``); the fixed point is the teacher's own
sample, so the result stays exact to the tolerance.

``tarflow.sampling.sample`` hands a student here, so every command and the validation callback
sample a student checkpoint through the same functions as a TarFlow. What a TarFlow sampler has
and a student has not: a schedule (ignored), guidance (fixed when it was distilled: the pairs'
sampler's), self-denoising (needs a likelihood: refused).
"""

from __future__ import annotations

import torch

from tarflow.model import Guidance, TarFlow
from tarflow.model.permutation import permute
from tarflow.model.student import NOT_A_FLOW, Student


@torch.no_grad()
def sample_student(student: Student, noise: torch.Tensor, y: torch.Tensor | None = None, *,
                   steps: int | None = None, denoise: float = 0.0) -> torch.Tensor:
    """Noise (B, N, D) -> images (B, C, H, W) in K = ``steps`` Euler steps (default: the
    student's own). ``tarflow.sampling.sample`` times it and names it ``student K=<K>``.

    Raises:
        ValueError: self-denoising asked for (a student has no likelihood), a bad step count
            or noise of another shape.
    """
    if denoise:
        raise ValueError(f"denoise={denoise}: self-denoising follows the model's likelihood "
                         f"gradient, and {NOT_A_FLOW}; sample the student with denoise 0")
    cfg = student.config
    if noise.shape[1:] != (cfg.num_patches, cfg.token_dim):
        raise ValueError(f"noise must be (B, {cfg.num_patches}, {cfg.token_dim}), got "
                         f"{tuple(noise.shape)}")
    return student.unpatchify(student.generate(noise, y, steps=steps))


@torch.no_grad()
def guided_forward(block, x: torch.Tensor, y: torch.Tensor | None,
                   guidance: Guidance) -> torch.Tensor:
    """One block's data -> noise map under the sampler's guidance: z = (x - mu(x)) / sigma(x)
    with the guided (sigma, mu) that the block's reverse step x = mu + sigma z uses. One
    parallel pass (two rows per sample with guidance); (B, N, D) raster order in and out."""
    g = block.guided(guidance)
    B, N, _ = x.shape
    xp = permute(x, block.flipped)  # (B, N, D) in the block's order
    out = block.predict(g.expand(xp), cond=block.class_bias(g.labels(y, B, x.device)),
                        q_scale=g.q_scale(B, x.device, x.dtype))  # (B', N, 2D)
    positions = torch.arange(1, N, device=x.device)
    sigma, mu = g.scale_shift(out[:, :-1], positions, N, block.sigma)  # (B, N - 1, D) each
    zp = xp.clone()
    zp[:, 1:] = (xp[:, 1:] - mu) / sigma  # token 0 is the identity
    return permute(zp, block.flipped)


@torch.no_grad()
def student_guesses(model: TarFlow, student: Student, noise: torch.Tensor,
                    y: torch.Tensor | None, guidance: Guidance, *,
                    steps: int | None = None) -> dict[int, torch.Tensor]:
    """Every block's input as the student's sample implies it: x^ = student(noise), then the
    teacher's guided forward pass, block 0 first. ``{block id: (B, N, D) raster}``; block b's
    Jacobi solve starts there (``init="student"``)."""
    h = student.generate(noise.to(next(student.parameters()).dtype), y, steps=steps)
    h = h.to(noise.dtype)
    guesses = {}
    for block in model.blocks:
        guesses[block.index] = h
        if not block.is_identity:
            h = guided_forward(block, h, y, guidance)
    return guesses


_LOADED: dict[tuple[str, str, str], Student] = {}


def resolve_student(student: Student | str | None, like: torch.Tensor) -> Student | None:
    """A student, or one loaded (once per process) from its checkpoint onto ``like``'s device
    and dtype (a sampler config names it by path: ``sampler.student``)."""
    if student is None or isinstance(student, Student):
        return student
    key = (str(student), str(like.device), str(like.dtype))
    if key not in _LOADED:
        from tarflow.model.loading import load_for_sampling

        net = load_for_sampling(student, device=like.device).net
        if not isinstance(net, Student):
            raise ValueError(f"sampler.student={student} is not a distilled student checkpoint")
        _LOADED[key] = net.to(like.dtype)
    return _LOADED[key]
