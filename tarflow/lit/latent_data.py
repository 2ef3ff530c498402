"""LightningDataModule of a latent model: pre-encoded latents, or images encoded on the fly.

:class:`LatentDataModule` is a :class:`~tarflow.lit.datamodule.TarFlowDataModule` whose ``name``,
``root``, ``img_size``, ``channels`` and dataset options describe the *images* (the data
``tarflow-encode`` read, and the reference images of FID), plus

* ``latents``: the directory ``tarflow-encode`` wrote. Train and val batches are then latents
  (:class:`~tarflow.data.latents.LatentDataset`), and :meth:`setup` refuses a manifest made
  with another autoencoder (weights fingerprint, scale, shift, encode mode) or from other data
  (name, resolution, channels, classes). ``null`` encodes on the fly: batches are images, which
  the LightningModule's space encodes on the device (``LatentSpace.flow_inputs``);
* ``latent_size``, ``latent_channels``: the latent facts the model config reads by
  interpolation (``model.img_size: ${data.latent_size}``), checked against the latents found;
* ``autoencoder``: the configured ``model.autoencoder`` (interpolated), for the guard.

:meth:`image_set` gives the images of a split whatever the batches are: the sampling
callback's FID reference statistics come from real images, never from decoded latents.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.utils.data import Dataset

from tarflow.data import DataError, build_dataset
from tarflow.data.latents import LatentDataset, check_manifest
from tarflow.lit.datamodule import TarFlowDataModule
from tarflow.model.autoencoder import resolve_autoencoder


class LatentDataModule(TarFlowDataModule):
    """Latents (or images to encode) for a latent TarFlow; see the module docstring.

    Args:
        name: the image dataset's registry name (``demo``, ``imagenet256``, ...).
        latents: the encoded directory, or None to encode images on the fly.
        latent_size: the latents' side (image side / the autoencoder's downsampling).
        latent_channels: the latents' channels.
        autoencoder: the ``model.autoencoder`` spec (or record) the latents must come from.
        **kwargs: everything :class:`TarFlowDataModule` takes, describing the images.
    """

    def __init__(self, name: str, *, latents: str | None = None, latent_size: int,
                 latent_channels: int, autoencoder: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.latents = None if latents in (None, "") else str(latents)
        self.latent_size = int(latent_size)
        self.latent_channels = int(latent_channels)
        self.autoencoder = None if autoencoder is None else dict(autoencoder)
        self._images: dict[str, Dataset] = {}

    @property
    def on_the_fly(self) -> bool:
        return self.latents is None

    def _build(self, split: str, extra: dict[str, Any]) -> Dataset:
        if self.on_the_fly:
            return super()._build(split, extra)  # images; the module's space encodes them
        # tarflow-encode names its splits train and val, whatever data.val_split reads.
        ds = LatentDataset(self.latents, "train" if split == "train" else "val",
                           flip=self.flip, random=split == "train")
        identity = (None if self.autoencoder is None
                    else resolve_autoencoder(self.autoencoder).identity())
        check_manifest(ds.manifest, autoencoder=identity, where=self.latents,
                       source={"name": self.name, "img_size": self.img_size,
                               "channels": self.channels, "num_classes": self.num_classes})
        if self.flip and ds.manifest.get("flip") != "both" and split == "train":
            raise DataError(
                f"data.flip=true but the latents in {self.latents} hold one orientation only; "
                f"re-encode with encode.flip=true (both orientations), set data.flip=false, "
                f"or encode on the fly (data.latents=null)")
        if (ds.channels, ds.img_size) != (self.latent_channels, self.latent_size):
            raise DataError(
                f"the latents in {self.latents} are {ds.channels}x{ds.img_size}x{ds.img_size} "
                f"but data.latent_channels={self.latent_channels}, data.latent_size="
                f"{self.latent_size}; fix the data config")
        if len(ds) == 0:
            raise DataError(f"{self.latents} holds no {split} latents")
        return ds

    def image_set(self, split: str) -> Dataset:
        """The real images of ``split`` ("train" or "val"), never flipped: the FID reference."""
        if split not in self._images:
            extra = self.train_kwargs if split == "train" else self.val_kwargs
            self._images[split] = build_dataset(
                self.name, root=self.root, img_size=self.img_size,
                split=self.val_split if split == "val" else split, channels=self.channels,
                flip=False, **extra)
        return self._images[split]
