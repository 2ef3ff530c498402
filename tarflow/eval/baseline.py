"""The reference implementation's KV-cache behaviour, kept only as a benchmark baseline.

The published sampling loops append each step's keys and values with ``torch.cat``, so step i
copies the whole cache of i tokens: quadratic memory traffic over a sequence. ``ConcatKVCache``
reproduces that growth behind our cache interface, so the same flow blocks can be timed with
both caches in one process and the speed-up of preallocation is measured, not claimed.
"""

from __future__ import annotations

import torch

from tarflow.model import TarFlow
from tarflow.model.attention import KVCache
from tarflow.model.guidance import Guidance


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
                             annealed: bool = False) -> torch.Tensor:
    """The sequential loop with a ``torch.cat``-grown cache; same images as sample_sequential."""
    g = Guidance(guidance, attn_temp, annealed)
    x = noise
    for block in reversed(model.blocks):
        x = block.reverse(x, y, guidance=g, cache=ConcatKVCache(len(block.attn_blocks)))
    return model.unpatchify(x)
