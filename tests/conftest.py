"""Fixtures shared by the unit and integration tests of latent models (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest


def save_tiny_autoencoder(path: Path, *, seed: int = 0, image_channels: int = 1,
                          widths: tuple[int, ...] = (8, 16)) -> Path:
    """A randomly initialised ``AutoencoderKL`` (8x8 images -> 4x4x4 latents with two widths),
    written with ``save_pretrained``: the directory a user's ``model.autoencoder.path`` names."""
    from tarflow.model.autoencoder import small_autoencoder

    vae = small_autoencoder(image_channels=image_channels, latent_channels=4, widths=widths,
                            sample_size=8, seed=seed)
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_autoencoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_autoencoder(tmp_path_factory.mktemp("autoencoders") / "tiny")
