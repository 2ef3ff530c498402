"""Classifier-free and attention-temperature guidance of a flow block's affine step.

With guidance the network runs two branches in one batched call: rows [0, B) are the
conditional branch (the given labels, attention temperature 1) and rows [B, 2B) the "uncond" branch
(the mean class embedding, attention logits divided by ``attn_temp``). Each position's step
x = mu + sigma * z is then guided by one of two rules, with weight g = w everywhere, or annealed
along the sequence as g_i = w * i / (N - 1) for output position i (the token fed at step i - 1 of
the sequential loop), restarting in each block:

- ``linear`` (TarFlow): push the raw outputs away from the unconditional ones,
  a <- a + g (a - a_u), b <- b + g (b - b_u); then sigma = scale(a), mu = b.
- ``starflow`` (STARFlow, STARFLOW.md §4): sample from the Gaussian proportional to
  p_c^(1 + g) p_u^(-g), whose precision is (1 + g) / sigma_c^2 - g / sigma_u^2; with the variance
  ratio clipped, s = min(sigma_c / sigma_u, 1)^2 (so the precision stays positive),
  sigma = sigma_c / sqrt(1 + g - g s) and mu = ((1 + g) mu_c - g s mu_u) / (1 + g - g s).

For an unconditional model the two branches differ only by the attention temperature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Scale = Callable[[torch.Tensor], torch.Tensor]  # a -> sigma, the block's scale function


@dataclass(frozen=True)
class Guidance:
    """Guidance knobs; ``scale == 0`` means no guidance (one branch, no extra compute)."""

    scale: float = 0.0
    attn_temp: float = 1.0
    annealed: bool = False
    rule: str = "linear"

    def __post_init__(self) -> None:
        if self.attn_temp <= 0:
            raise ValueError(f"attn_temp={self.attn_temp} must be > 0")
        if self.rule not in RULES:
            raise ValueError(f"guidance rule {self.rule!r} does not exist; rules: "
                             f"{', '.join(RULES)}")

    @property
    def active(self) -> bool:
        return self.scale != 0.0

    def for_block(self, conditional: bool) -> Guidance:
        """The guidance one block gets: none for a block without a class embedding (e.g. the
        shallow blocks of ``cond_deep_only``) when the temperature is 1, as both branches would
        be the same computation."""
        if self.active and not conditional and self.attn_temp == 1.0:
            return Guidance()
        return self

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

    def scale_shift(self, out: torch.Tensor, positions: torch.Tensor, num_patches: int,
                    scale: Scale) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma, mu) of the conditional rows' step x = mu + sigma * z, guided by the rule.

        Args:
            out: (2B, L, 2D) the network's output for both branches, or (B, L, 2D) when
                guidance is off; a = [..., :D], b = [..., D:].
            positions: (L,) the output positions these columns belong to (used when annealed).
            scale: the block's a -> sigma (exp, or STARFlow's softplus).

        Returns:
            sigma, mu, each (B, L, D).
        """
        D = out.shape[-1] // 2
        if not self.active:
            return scale(out[..., :D]), out[..., D:]
        return RULES[self.rule](out, self.weight(positions, num_patches), scale)


def linear_rule(out: torch.Tensor, g: torch.Tensor | float, scale: Scale
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """TarFlow: a + g (a - a_u) and b + g (b - b_u), then sigma = scale(a)."""
    half, D = out.shape[0] // 2, out.shape[-1] // 2
    w = (1.0 + g).to(out.dtype) if isinstance(g, torch.Tensor) else 1.0 + g
    # lerp(u, c, 1 + g) = c + g (c - u): one kernel for a and b instead of six small ones,
    # which matters in the overhead-bound sequential loop.
    guided = torch.lerp(out[half:], out[:half], w)  # (B, L, 2D)
    return scale(guided[..., :D]), guided[..., D:]


def starflow_rule(out: torch.Tensor, g: torch.Tensor | float, scale: Scale
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """STARFlow: the Gaussian proportional to p_c^(1 + g) p_u^(-g), variance ratio clipped at 1
    (module docstring)."""
    half, D = out.shape[0] // 2, out.shape[-1] // 2
    cond, uncond = out[:half], out[half:]
    sigma_c, sigma_u = scale(cond[..., :D]), scale(uncond[..., :D])
    ratio = (sigma_c / sigma_u).clamp(max=1.0).square()  # s <= 1 keeps the precision positive
    if isinstance(g, torch.Tensor):
        g = g.to(out.dtype)
    denom = 1.0 + g - g * ratio  # >= 1
    mu = ((1.0 + g) * cond[..., D:] - g * ratio * uncond[..., D:]) / denom
    return sigma_c * denom.rsqrt(), mu


RULES = {"linear": linear_rule, "starflow": starflow_rule}
