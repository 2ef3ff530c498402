"""Token orderings of the flow blocks.

Block b reads the sequence in raster order when b is even and reversed when b is odd, so every
position is conditioned on every other one across two blocks. Both orderings are their own inverse.
"""

from __future__ import annotations

import torch


def is_flipped(block: int) -> bool:
    """Whether forward block ``block`` reverses the sequence."""
    return block % 2 == 1


def permute(x: torch.Tensor, flipped: bool, dim: int = 1) -> torch.Tensor:
    """Apply (or undo: the same call) a block's ordering along ``dim``."""
    return x.flip(dim) if flipped else x
