"""Where a flow's data lives: pixels, or an autoencoder's latents. The one place that decides.

A TarFlow is agnostic: it models tensors of its configured shape. Every consumer that touches
images (the LightningModule, the validation callback, ``tarflow-sample`` / ``-eval`` / ``-bench``)
asks a *space* instead of branching on "latent or not":

* :meth:`PixelSpace.flow_inputs` turns a batch of real data into what the flow models (the
  identity for pixels; for latents, images are encoded and latents pass through, so a datamodule
  may hand over either: pre-encoded latents, or images to encode on the fly);
* :meth:`PixelSpace.decode` turns what the flow samples into images in [-1, 1] (grids, FID);
* :attr:`PixelSpace.image_shape` is the images' (C, H, W), e.g. for the reference data of FID.

A :class:`LatentSpace` loads its autoencoder on first use and on the device of the data it is
given; it is shared, never copied (EMA's deep copy of the module keeps the same one) and travels
to spawned processes as its record only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tarflow.model.autoencoder import Autoencoder, AutoencoderRecord, resolve_autoencoder
from tarflow.model.config import TarFlowConfig


class PixelSpace:
    """The flow models images directly.

    Attributes:
        latent: False.
        record: None (no autoencoder).
        flow_shape, image_shape: (C, S, S) of the flow's configuration, both.
    """

    latent = False
    record: AutoencoderRecord | None = None

    def __init__(self, config: TarFlowConfig) -> None:
        self.flow_shape = (config.in_channels, config.img_size, config.img_size)
        self.image_shape = self.flow_shape

    def flow_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) images -> the same tensor."""
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) samples -> the same tensor (images)."""
        return z

    def to(self, device: torch.device | str) -> PixelSpace:
        """Ready to work on ``device`` (nothing to do for pixels)."""
        return self

    def describe(self) -> str:
        return f"pixels {self.image_shape}"


class LatentSpace(PixelSpace):
    """The flow models an autoencoder's scaled latents (STARFLOW.md §5).

    Args:
        config: the flow's configuration (its ``img_size`` / ``in_channels`` are the latent's).
        record: the autoencoder's record.
        path: another location of the same autoencoder (a machine where the recorded path does
            not exist); its fingerprint must match the record's.
    """

    latent = True

    def __init__(self, config: TarFlowConfig, record: AutoencoderRecord, *,
                 path: str | None = None) -> None:
        if config.in_channels != record.latent_channels:
            raise ValueError(f"model.in_channels={config.in_channels} but the autoencoder's "
                             f"latents have {record.latent_channels} channels")
        self.record = record
        self.path = path
        side = config.img_size
        self.flow_shape = (record.latent_channels, side, side)
        self.image_shape = (record.image_channels, side * record.downsample,
                            side * record.downsample)
        self._autoencoder: Autoencoder | None = None

    # Shared, never copied: a frozen network, and copying it per EMA model would double memory.
    def __deepcopy__(self, memo: dict) -> LatentSpace:
        return self

    def __getstate__(self) -> dict[str, Any]:
        # Spawned processes reload the autoencoder from its record instead of unpickling it.
        return {**self.__dict__, "_autoencoder": None}

    def autoencoder(self, device: torch.device | str | None = None) -> Autoencoder:
        """The loaded autoencoder, moved to ``device`` when one is given."""
        if self._autoencoder is None:
            self._autoencoder = Autoencoder.load(self.record, path=self.path)
        if device is not None and next(self._autoencoder.parameters()).device != torch.device(
                device):
            self._autoencoder.to(device)
        return self._autoencoder

    def to(self, device: torch.device | str) -> LatentSpace:
        """Load the autoencoder onto ``device`` now: a broken one fails before any sampling,
        and the first decode is not charged with the loading."""
        self.autoencoder(device)
        return self

    def flow_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c, h, w) latents pass through; (B, C, H, W) images in [-1, 1] are encoded."""
        shape = tuple(x.shape[1:])
        if shape == self.flow_shape:
            return x
        if shape == self.image_shape:
            return self.autoencoder(x.device).encode(x)
        raise ValueError(f"a batch of shape {tuple(x.shape)} is neither latents "
                         f"{self.flow_shape} nor images {self.image_shape} of this latent model")

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, c, h, w) latents -> (B, C, H, W) images, in chunks of the record's size."""
        return self.autoencoder(z.device).decode(z)

    def describe(self) -> str:
        return (f"latents {self.flow_shape} of the autoencoder {self.record.path} "
                f"(fingerprint {self.record.fingerprint}) for images {self.image_shape}")


def make_space(config: TarFlowConfig, autoencoder: Mapping[str, Any] | AutoencoderRecord | None,
               *, path: str | None = None) -> PixelSpace:
    """The space of a flow with this configuration and autoencoder (None: pixels)."""
    if autoencoder is None:
        return PixelSpace(config)
    return LatentSpace(config, resolve_autoencoder(autoencoder), path=path)
