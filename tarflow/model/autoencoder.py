"""A frozen, pretrained KL autoencoder (diffusers' ``AutoencoderKL``) for latent flows.

STARFlow (STARFLOW.md §5) models the latents of Stable Diffusion's autoencoder instead of pixels:
``latent = (E(x) - shift) * scale`` and ``x = D(latent / scale + shift)``, where ``scale`` is the
autoencoder's ``scaling_factor`` (0.18215 for ``stabilityai/sd-vae-ft-ema``) and ``shift`` its
optional ``shift_factor`` (SD3-style autoencoders; 0 otherwise). The flow never changes: a latent
model is a TarFlow over latents plus this module.

An autoencoder is named by a *spec*, the ``model.autoencoder`` config (``path``: a local
directory written by ``save_pretrained`` or a Hugging Face hub id, and optional ``subfolder``,
``scaling_factor``, ``shift_factor``, ``encode``, ``chunk_size``, ``dtype``).
:func:`resolve_autoencoder` turns it into an :class:`AutoencoderRecord`: the same settings with
the scale and shift filled in from the autoencoder's own config, its latent geometry, and a
fingerprint of its weights. Records go into checkpoints and latent manifests, so a sample is
always decoded, and a latent file always read, with the autoencoder that made it.

Nothing is downloaded unless a hub id is given that is not in the local cache, and never when
``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

# Specs and records have their own module; the names callers use come with the network.
from tarflow.model.autoencoder_record import (  # noqa: F401
    AutoencoderError,
    AutoencoderRecord,
    locate,
    resolve_autoencoder,
)


# ----------------------------------------------------------------------------- the module
class Autoencoder(nn.Module):
    """A frozen ``AutoencoderKL`` in eval mode that maps images to scaled latents and back.

    Args:
        vae: the diffusers model.
        record: its record (scale, shift, encode mode, chunk size).
    """

    def __init__(self, vae: nn.Module, record: AutoencoderRecord) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.record = record

    def train(self, mode: bool = True) -> Autoencoder:
        # Frozen: a LightningModule's .train() must not switch it to training mode.
        return super().train(False)

    @classmethod
    def load(cls, spec: Mapping[str, Any] | AutoencoderRecord, *, path: str | None = None,
             device: torch.device | str = "cpu") -> Autoencoder:
        """Build from a spec or record; ``path`` points at another copy of the same weights
        (refused when its fingerprint differs from the record's)."""
        from diffusers import AutoencoderKL

        record = resolve_autoencoder(spec)
        directory = locate(record, path)
        dtype = getattr(torch, record.dtype)
        # low_cpu_mem_usage needs `accelerate`; an autoencoder is small enough without it.
        vae = AutoencoderKL.from_pretrained(directory, torch_dtype=dtype, local_files_only=True,
                                            low_cpu_mem_usage=False)
        return cls(vae, record).to(device)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _chunks(self, x: torch.Tensor):
        step = self.record.chunk_size
        return (x[i:i + step] for i in range(0, x.shape[0], step))

    @torch.no_grad()
    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled posterior mean and standard deviation of images.

        Args:
            images: (B, C, H, W) in [-1, 1].

        Returns:
            mean, std: (B, c, H / f, W / f) each, in the images' dtype.
        """
        r = self.record
        means, stds = [], []
        for chunk in self._chunks(images):
            dist = self.vae.encode(chunk.to(self.dtype)).latent_dist
            means.append((dist.mean - r.shift_factor) * r.scaling_factor)
            stds.append(dist.std * r.scaling_factor)
        return torch.cat(means).to(images.dtype), torch.cat(stds).to(images.dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, generator: torch.Generator | None = None,
               sample: bool | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> scaled latents (B, c, H / f, W / f).

        ``sample`` (default: the record's ``encode`` mode) draws from the posterior with
        ``generator`` instead of taking its mean.
        """
        mean, std = self.posterior(images)
        if not (self.record.encode == "sample" if sample is None else sample):
            return mean
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * eps

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, c, h, w) -> images (B, C, h * f, w * f), nominally [-1, 1]."""
        r = self.record
        out = [self.vae.decode(chunk.to(self.dtype) / r.scaling_factor + r.shift_factor).sample
               for chunk in self._chunks(latents)]
        return torch.cat(out).to(latents.dtype)


def small_autoencoder(*, image_channels: int = 1, latent_channels: int = 4,
                      widths: tuple[int, ...] = (32, 64), layers_per_block: int = 1,
                      sample_size: int = 16, seed: int | None = 0) -> nn.Module:
    """A small randomly initialised ``AutoencoderKL`` (downsampling 2^(len(widths) - 1)): the
    demo's autoencoder before ``tarflow-train-ae`` trains it, and the tests' stand-in."""
    from diffusers import AutoencoderKL

    if seed is not None:
        torch.manual_seed(seed)
    groups = min(32, math.gcd(*widths))  # GroupNorm needs a divisor of every width
    return AutoencoderKL(in_channels=image_channels, out_channels=image_channels,
                         down_block_types=("DownEncoderBlock2D",) * len(widths),
                         up_block_types=("UpDecoderBlock2D",) * len(widths),
                         block_out_channels=tuple(widths), layers_per_block=layers_per_block,
                         latent_channels=latent_channels, norm_num_groups=groups,
                         sample_size=sample_size)
