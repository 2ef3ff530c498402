"""Classifier-free and attention-temperature guidance of a flow block's (a, b).

With guidance the network runs two branches in one batched call: rows [0, B) are the
conditional branch (the given labels, attention temperature 1) and rows [B, 2B) the "uncond" branch
(the mean class embedding, attention logits divided by ``attn_temp``). The conditional
model's affine parameters are then pushed away from the unconditional ones, on both a and b:
    a <- a + g (a - a_u),    b <- b + g (b - b_u),
with g = w everywhere, or annealed along the sequence as g_i = w * i / (N - 1) for output position i
(the token fed at step i - 1 of the sequential loop), restarting in each block.
For an unconditional model the two branches differ only by the attention temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Guidance:
    """Guidance knobs; ``scale == 0`` means no guidance (one branch, no extra compute)."""

    scale: float = 0.0
    attn_temp: float = 1.0
    annealed: bool = False

    def __post_init__(self) -> None:
        if self.attn_temp <= 0:
            raise ValueError(f"attn_temp={self.attn_temp} must be > 0")

    @property
    def active(self) -> bool:
        return self.scale != 0.0

    def check(self, conditional: bool) -> None:
        """Refuse guidance that would silently do nothing."""
        if self.active and not conditional and self.attn_temp == 1.0:
            raise ValueError(
                "guidance on an unconditional model needs attn_temp != 1: both branches would be "
                "identical and the guidance would do nothing (the paper uses e.g. attn_temp=0.3)"
            )

    def labels(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """Labels of the network batch: (B,) or (2B,) with -1 (the null class) for uncond rows."""
        if y is None:
            y = torch.full((batch,), -1, dtype=torch.long, device=device)
        if not self.active:
            return y
        return torch.cat([y, torch.full_like(y, -1)])

    def q_scale(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """Per-row query factor (2B, 1, 1, 1): 1 for the cond rows, 1/attn_temp for uncond rows."""
        if not self.active or self.attn_temp == 1.0:
            return None
        scale = torch.ones(2 * batch, 1, 1, 1, device=device, dtype=dtype)
        scale[batch:] = 1.0 / self.attn_temp
        return scale

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """Duplicate the rows for the two branches: (B, ...) -> (2B, ...)."""
        return torch.cat([x, x]) if self.active else x

    def weight(self, positions: torch.Tensor, num_patches: int) -> torch.Tensor | float:
        """g for each output position: (L, 1) when annealed, else the scalar w."""
        if not self.annealed:
            return self.scale
        return (self.scale * positions.to(torch.float64) / (num_patches - 1)).unsqueeze(-1)

    def combine(self, out: torch.Tensor, positions: torch.Tensor, num_patches: int
                ) -> torch.Tensor:
        """Guided network output of the cond rows: a + g (a - a_u) and b + g (b - b_u) at once.

        Args:
            out: (2B, L, 2D) the network's output for both branches, or (B, L, 2D) when
                guidance is off (returned unchanged).
            positions: (L,) the output positions these columns belong to (used when annealed).

        Returns:
            (B, L, 2D).
        """
        if not self.active:
            return out
        half = out.shape[0] // 2
        g = self.weight(positions, num_patches)
        w = (1.0 + g).to(out.dtype) if isinstance(g, torch.Tensor) else 1.0 + g
        # lerp(u, c, 1 + g) = c + g (c - u): one kernel for a and b instead of six small ones,
        # which matters in the overhead-bound sequential loop.
        return torch.lerp(out[half:], out[:half], w)
