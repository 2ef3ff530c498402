"""One block's fixed-point problem: the map F that Jacobi iterates and its initial guesses.

Sampling block b solves, in the block's token order, x = F(x) with
    F(x) = b(x) + sigma(a(x)) * z        (z: the block's sampling input, held fixed)
(ALGORITHMS.md §4). Every user of the problem reads it from here: the solver
(:mod:`tarflow.sampling.jacobi`), the IGM of the ranking (:mod:`tarflow.sampling.ranking`), the
speed loss terms (:mod:`tarflow.sampling.speed_losses`) and the plain baseline loop.

The initial guess X^(0) is chosen by name (``BlockSchedule.init``), through
:func:`initial_guess` only: a new named guess is one entry of ``GUESSES``. A caller may also
supply a guess for a block (``sample(..., guesses={block: x0})``, e.g. a learned prediction of the
block's input pushed through the forward pass); it replaces the named one for that block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tarflow.model.flow import FlowBlock


def _input(zp: torch.Tensor) -> torch.Tensor:
    return zp.clone()


def _zeros(zp: torch.Tensor) -> torch.Tensor:
    guess = torch.zeros_like(zp)
    guess[:, 0] = zp[:, 0]
    return guess


def _student(zp: torch.Tensor) -> torch.Tensor:
    # The student's guess is always supplied (sample() computes it once for every block).
    raise ValueError("init 'student' needs the student's guess: sample(..., student=<a "
                     "distilled student or its checkpoint>) or sampler.student=<checkpoint>")


# Named initial guesses: name -> X^(0) from the block's input zp (its token order).
GUESSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "z": _input,  # the block's input itself
    "zeros": _zeros,  # [z_0, 0, ..., 0]
    "student": _student,  # a distilled student's sample through the forward pass
}
INITS = tuple(GUESSES)


def initial_guess(zp: torch.Tensor, init: str, *,
                  supplied: torch.Tensor | None = None) -> torch.Tensor:
    """X^(0) in the block's token order: the guess named ``init``, or ``supplied``.

    Args:
        zp: (B, N, D) the block's sampling input, in its token order.
        init: a name of ``GUESSES`` (``INITS``).
        supplied: a caller's guess (B, N, D) in the same order, used instead of the named one;
            its position 0 is replaced by z_0 (position 0 is the identity, never solved).

    Returns:
        A new tensor (the solver updates it in place), zp's dtype and device.
    """
    if supplied is not None:
        if supplied.shape != zp.shape:
            raise ValueError(f"a supplied initial guess must be {tuple(zp.shape)} like the "
                             f"block's input, got {tuple(supplied.shape)}")
        guess = supplied.to(device=zp.device, dtype=zp.dtype, copy=True)
        guess[:, 0] = zp[:, 0]
        return guess
    if init not in GUESSES:
        raise ValueError(f"init={init!r} must be one of {INITS}")
    return GUESSES[init](zp)


def fixed_point_map(block: FlowBlock, xp: torch.Tensor, zp: torch.Tensor, *,
                    cond: torch.Tensor | float = 0.0) -> torch.Tensor:
    """F(x) = b(x) + sigma(a(x)) * z, one Jacobi update of the whole sequence (no guidance).

    Args:
        xp: (B, N, D) current iterate, permuted frame (the block's token order).
        zp: (B, N, D) the block's output in the same frame.

    Returns:
        (B, N, D); position 0 is z_0 (a = b = 0 there).
    """
    a, b = block.affine(xp, cond=cond)
    return b + block.sigma(a) * zp
