"""Loops of the reference implementations, kept only as benchmark baselines.

- The published sequential loops append each step's keys and values with ``torch.cat``, so step
  i copies the whole cache of i tokens: quadratic memory traffic over a sequence.
  ``ConcatKVCache`` reproduces that growth behind our cache interface, so the same flow blocks
  can be timed with both caches in one process and the speed-up of preallocation is measured,
  not claimed.
- The GS-Jacobi authors' Jacobi loop runs a fixed number of full causal passes per block with no
  stopping test, residual, per-sample exit or cache: ``sample_jacobi_plain``. At equal iteration
  counts our solver must cost no more than this (its bookkeeping has to pay for itself).
"""

from __future__ import annotations

import torch

from tarflow.model import TarFlow
from tarflow.model.attention import KVCache
from tarflow.model.guidance import Guidance
from tarflow.model.permutation import permute
from tarflow.sampling.fixed_point import initial_guess


class ConcatKVCache(KVCache):
    """Per-layer K/V lists grown with ``torch.cat`` at every step (sequential use only)."""

    def __init__(self, layers: int) -> None:
        self.ks: list[torch.Tensor | None] = [None] * layers
        self.vs: list[torch.Tensor | None] = [None] * layers

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self.ks[layer], self.vs[layer]
        if old_k is None:
            self.ks[layer], self.vs[layer] = k, v
        else:
            if old_k.shape[2] != start:
                raise ValueError("ConcatKVCache only supports appending one step after another")
            self.ks[layer] = torch.cat([old_k, k], dim=2)  # copies all i cached tokens
            self.vs[layer] = torch.cat([old_v, v], dim=2)
        return self.ks[layer], self.vs[layer]


@torch.no_grad()
def sample_sequential_concat(model: TarFlow, noise: torch.Tensor, y: torch.Tensor | None = None,
                             *, guidance: float = 0.0, attn_temp: float = 1.0,
                             annealed: bool = False, guidance_rule: str = "linear"
                             ) -> torch.Tensor:
    """The sequential loop with a ``torch.cat``-grown cache; same images as sample_sequential."""
    g = Guidance(guidance, attn_temp, annealed, guidance_rule)
    x = noise
    for block in reversed(model.blocks):
        if not block.is_identity:
            x = block.reverse(x, y, guidance=g, cache=ConcatKVCache(len(block.attn_blocks)))
    return model.unpatchify(x)


@torch.no_grad()
def sample_jacobi_plain(model: TarFlow, noise: torch.Tensor, y: torch.Tensor | None = None, *,
                        iters: int, init: str = "z", guidance: float = 0.0,
                        attn_temp: float = 1.0, annealed: bool = False,
                        guidance_rule: str = "linear") -> torch.Tensor:
    """``iters`` plain Jacobi iterations in every block: each one full causal pass over the
    whole (permuted) sequence, then x = z * sigma(a) + b everywhere."""
    g = Guidance(guidance, attn_temp, annealed, guidance_rule)
    B, N, _ = noise.shape
    positions = torch.arange(N, device=noise.device)
    x = noise
    for block in reversed(model.blocks):
        if block.is_identity:
            continue
        gb = block.guided(g)
        zp = permute(x, block.flipped)
        xp = initial_guess(zp, init)
        cond = block.class_bias(gb.labels(y, B, noise.device))
        q_scale = gb.q_scale(B, noise.device, noise.dtype)
        for _ in range(iters):
            a, b = block.affine(gb.expand(xp), cond=cond, q_scale=q_scale)  # (B', N, D) each
            sigma, mu = gb.scale_shift(torch.cat([a, b], -1), positions, N, block.sigma)
            xp = zp * sigma + mu
        x = permute(xp, block.flipped)
    return model.unpatchify(x)
