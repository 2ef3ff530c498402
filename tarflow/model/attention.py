"""Causal self-attention with an explicit, preallocated KV cache.

The cache is a plain object the sampler owns: one K and one V buffer per layer, allocated once at
full sequence length. Writing the keys of tokens [start, start + L) overwrites those slots in place,
so the sequential loop never grows a tensor with ``torch.cat`` (which would make sampling quadratic
in memory traffic), and a Jacobi iteration can rewrite its segment's slots every iteration while
attending to the frozen slots of earlier segments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (bf16 statistics are too coarse)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            w, b = self.weight.float(), self.bias.float()
            return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)
        return super().forward(x)


class KVCache:
    """Keys and values of every layer of one flow block, for a fixed batch and sequence length.

    Attributes:
        k, v: (layers, B, heads, N, head_dim) buffers.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k = k
        self.v = v

    @classmethod
    def empty(cls, layers: int, batch: int, heads: int, length: int, head_dim: int, *,
              dtype: torch.dtype, device: torch.device | str) -> KVCache:
        shape = (layers, batch, heads, length, head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device),
                   torch.empty(shape, dtype=dtype, device=device))

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def select(self, rows: torch.Tensor, end: int) -> KVCache:
        """A new cache holding ``rows`` of this one, slots [0, end) copied, later slots empty."""
        k = torch.empty((self.k.shape[0], len(rows), *self.k.shape[2:]),
                        dtype=self.k.dtype, device=self.k.device)
        v = torch.empty_like(k)
        k[:, :, :, :end] = self.k[:, rows, :, :end]
        v[:, :, :, :end] = self.v[:, rows, :, :end]
        return KVCache(k, v)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write K/V (B, heads, L, head_dim) of tokens [start, start + L) in place; return all
        keys and values of slots [0, start + L) as views (no copy)."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def put(self, rows: torch.Tensor, other: KVCache, start: int, end: int) -> None:
        """Copy slots [start, end) of ``other`` (whose batch is ``rows``) into our ``rows``."""
        self.k[:, rows, :, start:end] = other.k[:, :, :, start:end]
        self.v[:, rows, :, start:end] = other.v[:, :, :, start:end]


class Attention(nn.Module):
    """Pre-norm multi-head causal self-attention (state-dict keys: norm, qkv, proj)."""

    def __init__(self, channels: int, head_dim: int) -> None:
        super().__init__()
        self.norm = LayerNorm32(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.head_dim = head_dim
        self.num_heads = channels // head_dim

    def forward(self, h: torch.Tensor, *, layer: int = 0, cache: KVCache | None = None,
                start: int = 0, q_scale: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend causally.

        Args:
            h: (B, L, Ch) the hidden states of tokens [start, start + L).
            layer: which layer's slots of ``cache`` to use.
            cache: if given, K/V of these tokens are written at [start, start + L) and the
                queries attend to slots [0, start + L); slots before ``start`` must be filled.
                Without a cache ``start`` must be 0 (a full causal pass).
            q_scale: optional (B, 1, 1, 1) factor on the queries; 1/attn_temp per sample, which is
                how the guidance branch divides its attention logits by a temperature while sharing
                one batched call with the conditional branch.
            mask: (L, start + L) bool causal mask for a chunk after ``start`` (a slice of the
                block's mask, so no per-call allocation); built here if missing.

        Returns:
            (B, L, Ch) the attention output (before the residual add).
        """
        B, L, C = h.shape
        qkv = self.qkv(self.norm(h))  # (B, L, 3Ch): q | k | v, each (heads, head_dim)
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # q, k, v: (B, heads, L, head_dim)
        if q_scale is not None:
            q = q * q_scale.to(q.dtype)
        end = start + L
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # (B, heads, end, head_dim)
        elif start != 0:
            raise ValueError("attention without a cache must start at position 0")
        if L == 1:
            out = F.scaled_dot_product_attention(q, k, v)  # one query sees every cached slot
        elif start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Query j sits at absolute position start + j and may see slots <= start + j.
            if mask is None:
                mask = torch.ones(L, end, dtype=torch.bool, device=h.device).tril(diagonal=start)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(B, L, C)  # (B, L, heads * head_dim)
        return self.proj(out)
