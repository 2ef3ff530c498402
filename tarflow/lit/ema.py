"""Exponential moving average of the weights, with a warm-up, on Lightning's WeightAveraging.

Why not ``EMAWeightAveraging`` as is: its first update copies the step-1 weights and then decays
them with a fixed rate, so with decay 0.9999 the near-identity initial network still holds
``0.9999**t`` of the average after t steps (37% after 10k steps): validation and samples lag far
behind training in any run shorter than a few times ``1 / (1 - decay)`` steps. Here the effective
decay after n updates is ``min(decay, (1 + n) / (warmup + n))``, so the average spans roughly the
last ``1 / warmup`` of training early on and the configured horizon later.

Checkpoints (behaviour inherited from ``WeightAveraging``): ``state_dict`` holds the EMA weights,
``current_model_state`` the raw ones and ``averaging_state`` the update count ``n_averaged``;
resuming restores all three, so the EMA continues exactly. Validation runs on the EMA weights,
and after fit the module holds them.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import WeightAveraging


class WarmupEMA:
    """``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel``: one fused lerp per
    device/dtype group, and one host read of the update count per step (a per-tensor
    ``avg_fn`` would synchronise with the GPU once per parameter).

    A class (not a closure) so the callback pickles into ``ddp_spawn`` workers.

    Args:
        decay: the decay the warm-up approaches (e.g. 0.9999).
        warmup: W in ``(1 + n) / (W + n)``; 0 disables the warm-up (fixed decay).
    """

    def __init__(self, decay: float, warmup: float = 10.0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay} must be in [0, 1)")
        self.decay = float(decay)
        self.warmup = float(warmup)

    def effective_decay(self, n: int) -> float:
        """Decay used for the (n + 1)-th update (n = updates already averaged)."""
        if self.warmup <= 0:
            return self.decay
        return min(self.decay, (1.0 + n) / (self.warmup + n))

    def __call__(
        self,
        averaged: list[torch.Tensor],
        current: list[torch.Tensor],
        num_averaged: torch.Tensor | int,
    ) -> None:
        d = self.effective_decay(int(num_averaged))
        # In place: averaged += (1 - d) * (current - averaged) = d * averaged + (1 - d) * current.
        torch._foreach_lerp_(averaged, current, 1.0 - d)


class EMA(WeightAveraging):
    """EMA callback with warm-up; list it after any callback that must see the EMA weights.

    Args:
        decay: target decay; the horizon is about ``1 / (1 - decay)`` optimiser steps.
        warmup: warm-up constant W (see module doc); 0 = plain fixed-decay EMA.
        update_every_n_steps: update the average every n optimiser steps.
        update_starting_at_step: first optimiser step (0-based) that updates the average.
        device: where the averaged copy lives (None = the model's device; "cpu" saves GPU memory).
        use_buffers: also average buffers (TarFlow's buffers are constants, so either is fine).
    """

    def __init__(
        self,
        decay: float = 0.9999,
        warmup: float = 10.0,
        update_every_n_steps: int = 1,
        update_starting_at_step: int = 0,
        device: torch.device | str | None = None,
        use_buffers: bool = True,
    ) -> None:
        if update_every_n_steps < 1:
            raise ValueError(f"update_every_n_steps={update_every_n_steps} must be >= 1")
        super().__init__(
            device=device, use_buffers=use_buffers, multi_avg_fn=WarmupEMA(decay, warmup)
        )
        self.decay = float(decay)
        self.warmup = float(warmup)
        self.update_every_n_steps = int(update_every_n_steps)
        self.update_starting_at_step = int(update_starting_at_step or 0)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Update after optimiser steps only (never at epoch ends)."""
        if step_idx is None:
            return False
        started = step_idx >= self.update_starting_at_step
        return (
            started and (step_idx - self.update_starting_at_step) % self.update_every_n_steps == 0
        )
