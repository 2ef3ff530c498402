"""Transformer layer of a flow block: pre-norm attention then pre-norm MLP, both residual."""

from __future__ import annotations

import torch
from torch import nn

from tarflow.model.attention import Attention, KVCache, LayerNorm32


class MLP(nn.Module):
    """Pre-norm MLP (state-dict keys: norm, main.0, main.2); exact (erf) GELU as in the paper."""

    def __init__(self, channels: int, expansion: int) -> None:
        super().__init__()
        self.norm = LayerNorm32(channels)
        self.main = nn.Sequential(
            nn.Linear(channels, channels * expansion),
            nn.GELU(),
            nn.Linear(channels * expansion, channels),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.main(self.norm(h))


class TransformerLayer(nn.Module):
    """h += Attn(LN(h)); h += MLP(LN(h)) (state-dict keys: attention, mlp)."""

    def __init__(self, channels: int, head_dim: int, expansion: int) -> None:
        super().__init__()
        self.attention = Attention(channels, head_dim)
        self.mlp = MLP(channels, expansion)

    def forward(self, h: torch.Tensor, *, layer: int = 0, cache: KVCache | None = None,
                start: int = 0, q_scale: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        h = h + self.attention(h, layer=layer, cache=cache, start=start, q_scale=q_scale,
                               mask=mask)
        return h + self.mlp(h)
