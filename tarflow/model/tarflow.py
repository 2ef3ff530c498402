"""The TarFlow model: patchify, T flow blocks, a Gaussian prior, likelihood, sequential inverse."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tarflow.model.checkpoint import build_from_checkpoint, compare_state_dicts, save_model
from tarflow.model.config import TarFlowConfig
from tarflow.model.flow import make_block
from tarflow.model.guidance import Guidance

# -log of the dequantisation bin width: 8-bit pixels mapped to [-1, 1] have bins of 2/256 = 1/128.
LOG_BIN = math.log(128.0)


@dataclass
class FlowOutput:
    """Result of a forward (data -> noise) pass.

    Attributes:
        z: (B, N, D) noise tokens (the output of the last forward block).
        logdet: (B,) sum over blocks of each block's per-dimension mean log-determinant.
        block_outputs: T tensors (B, N, D): the output of forward block 0, 1, ..., T-1, raster
            order (``block_outputs[-1] is z``); block b's input is ``block_outputs[b - 1]`` (the
            tokens for b = 0).
        block_logdets: T tensors (B,).
    """

    z: torch.Tensor
    logdet: torch.Tensor
    block_outputs: list[torch.Tensor] = field(default_factory=list)
    block_logdets: list[torch.Tensor] = field(default_factory=list)


class TarFlow(nn.Module):
    """Transformer autoregressive flow (Zhai et al. 2024), state-dict compatible with the official
    checkpoints.

    Example:
        >>> model = TarFlow(preset("tiny"))
        >>> out = model(images)                   # FlowOutput
        >>> loss = model.nll(images).mean()       # nats per dimension, no constants
        >>> x = model.reverse(model.sample_noise(4))
    """

    var: torch.Tensor

    def __init__(self, config: TarFlowConfig) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(make_block(config, b) for b in range(config.num_blocks))
        # Prior variance per dimension; ones in every published model (N(0, I)).
        self.register_buffer("var", torch.ones(config.num_patches, config.token_dim))

    # ------------------------------------------------------------------------- tokens <-> images
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) with unfold's channel order inside a token."""
        P = self.config.patch_size
        return F.unfold(x, kernel_size=P, stride=P).transpose(1, 2)  # (B, C*P*P, N) -> (B, N, D)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, C, H, W), the inverse of :meth:`patchify`."""
        P, S = self.config.patch_size, self.config.img_size
        return F.fold(tokens.transpose(1, 2), output_size=S, kernel_size=P, stride=P)

    def _check_labels(self, y: torch.Tensor | None) -> None:
        if y is None:
            return
        if not self.config.conditional:
            raise ValueError("labels were given to an unconditional TarFlow (num_classes=0)")
        if y.numel() and (int(y.max()) >= self.config.num_classes or int(y.min()) < -1):
            raise ValueError(f"labels must lie in [-1, {self.config.num_classes - 1}] "
                             f"(-1 = null class), got [{int(y.min())}, {int(y.max())}]")

    # ------------------------------------------------------------------------- likelihood
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> FlowOutput:
        """Data -> noise.

        Args:
            x: (B, C, H, W) images in [-1, 1] (plus any training noise).
            y: (B,) labels; -1 entries (label dropout) use the mean class embedding.
        """
        self._check_labels(y)
        h = self.patchify(x)  # (B, N, D)
        outputs, logdets = [], []
        for block in self.blocks:
            h, logdet = block(h, y)
            outputs.append(h)
            logdets.append(logdet)
        return FlowOutput(h, torch.stack(logdets).sum(0), outputs, logdets)

    def prior_nll(self, z: torch.Tensor) -> torch.Tensor:
        """(B,) per-dimension Gaussian negative log-density of z, without the 0.5 log(2 pi)."""
        z = z.to(torch.promote_types(z.dtype, torch.float32))  # bf16 squares lose the tail
        return 0.5 * (z.pow(2) / self.var + self.var.log()).mean(dim=(1, 2))

    def nll(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) training loss per sample: 0.5 mean(z^2) - sum_b logdet_b (nats/dim, no consts)."""
        out = self(x, y)
        return self.prior_nll(out.z) - out.logdet

    def bits_per_dim(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) bits per dimension of uniformly dequantised 8-bit images (ALGORITHMS.md §1)."""
        nats = self.nll(x, y) + 0.5 * math.log(2 * math.pi) + LOG_BIN
        return nats / math.log(2.0)

    # ------------------------------------------------------------------------- sampling
    def sample_noise(self, batch: int, *, generator: torch.Generator | None = None,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, N, D) prior noise z * sqrt(var)."""
        cfg = self.config
        dtype = dtype or self.var.dtype
        z = torch.randn(batch, cfg.num_patches, cfg.token_dim, generator=generator,
                        device=self.var.device, dtype=dtype)
        return z * self.var.sqrt().to(dtype)

    @torch.no_grad()
    def reverse(self, z: torch.Tensor, y: torch.Tensor | None = None, *, guidance: float = 0.0,
                attn_temp: float = 1.0, annealed: bool = False,
                guidance_rule: str = "linear") -> torch.Tensor:
        """Noise -> images with the exact sequential inverse (blocks T-1 ... 0).

        Args:
            z: (B, N, D) noise tokens, e.g. from :meth:`sample_noise`.
            y: (B,) labels for a conditional model (None = null class).
            guidance: w of classifier-free guidance (0 = off), applied to both a and b.
            attn_temp: attention temperature of the uncond branch.
            annealed: ramp the guidance linearly along the sequence in every block.
            guidance_rule: "linear" (TarFlow) or "starflow" (``tarflow.model.guidance``).

        Returns:
            (B, C, H, W) images.
        """
        self._check_labels(y)
        g = Guidance(guidance, attn_temp, annealed, guidance_rule)
        g.check(self.config.conditional)
        x = z
        for block in reversed(self.blocks):
            x = block.reverse(x, y, guidance=g)
        return self.unpatchify(x)

    # ------------------------------------------------------------------------- checkpoints
    @classmethod
    def from_checkpoint(cls, source: str | Path | dict, *, map_location: str | torch.device = "cpu",
                        **overrides) -> TarFlow:
        """Load an official ``.pth`` state dict, a Lightning checkpoint or our own file.

        The configuration is read from the file when it carries one, else inferred from tensor
        shapes; ``overrides`` set fields that shapes cannot tell (e.g. ``head_dim``, ``img_size``).
        Loading is ``strict=True`` and uses ``weights_only=True``.
        """
        return build_from_checkpoint(cls, source, map_location=map_location, **overrides)

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write ``{"tarflow_config", "state_dict"}`` atomically; read back by from_checkpoint."""
        return save_model(self, path)


def weights_mismatch(config: TarFlowConfig, state: dict[str, torch.Tensor]) -> list[str]:
    """Why ``state`` cannot be loaded into a TarFlow of ``config`` (empty when it can)."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation work
        model = TarFlow(config)
    return compare_state_dicts(model.state_dict(), state)
