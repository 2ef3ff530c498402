"""The latent experiments compose to their presets with the documented numbers, and
``experiment=imagenet256_latent`` builds at full size and starts (a tiny random 8x-downsampling
autoencoder in place of Stable Diffusion's, and data=fake)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tarflow.cli.train import build, train
from tarflow.lit.latent_data import LatentDataModule
from tarflow.lit.wandb_utils import finish_wandb
from tarflow.model import TarFlowConfig, preset
from tarflow.model.autoencoder import resolve_autoencoder
from tests.conftest import save_tiny_autoencoder
from tests.integration.conftest import compose_train


def flow_config(cfg) -> TarFlowConfig:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.pop("autoencoder")
    return TarFlowConfig(**model)


@pytest.mark.parametrize("name, batch, autoencoder", [
    ("demo_latent", 32, "outputs/autoencoders/demo"),
    ("imagenet256_latent", 1024, "stabilityai/sd-vae-ft-ema"),
])
def test_latent_experiments_compose_to_their_presets(tmp_path: Path, name: str, batch: int,
                                                     autoencoder: str) -> None:
    cfg = compose_train(tmp_path, [f"experiment={name}"])
    assert flow_config(cfg) == preset(name)
    assert str(cfg.model.autoencoder.path).endswith(autoencoder)
    assert cfg.data._target_.endswith("LatentDataModule") and cfg.data.latents
    assert cfg.data.latent_size * (2 if name == "demo_latent" else 8) == cfg.data.img_size
    assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes == batch
    assert cfg.callbacks.model_checkpoint.monitor == "val/latent_nll"
    assert cfg.module.noise.std == cfg.model.noise_std
    if name == "imagenet256_latent":
        assert cfg.module.optim.lr == 6.4e-5 and cfg.module.optim.min_lr == 1e-6
        assert cfg.model.noise_std == 0.3 and cfg.trainer.precision == "bf16-mixed"
        assert cfg.sampler.guidance_rule == "starflow" and cfg.module.label_drop == 0.1


@pytest.fixture(scope="module")
def rgb_autoencoder(tmp_path_factory) -> Path:
    """A random 3-channel AutoencoderKL that downsamples by 8, like Stable Diffusion's."""
    return save_tiny_autoencoder(tmp_path_factory.mktemp("ae") / "rgb8", image_channels=3,
                                 widths=(8, 8, 8, 8))


def test_imagenet256_latent_builds_at_full_size(tmp_path: Path, rgb_autoencoder: Path) -> None:
    cfg = compose_train(tmp_path, [
        "experiment=imagenet256_latent", "data=fake", "data.img_size=256",
        f"model.autoencoder.path={rgb_autoencoder}", "trainer.accelerator=cpu",
        "trainer.precision=32-true"])
    assert resolve_autoencoder({"path": str(rgb_autoencoder)}).downsample == 8
    with torch.device("meta"):  # 1.41B parameters: shapes only
        parts = build(cfg)
    try:
        module, dm = parts["module"], parts["datamodule"]
        assert isinstance(dm, LatentDataModule) and dm.latent_size == 32
        assert module.space.latent and module.space.image_shape == (3, 256, 256)
        assert module.net.config.depths == (2, 2, 2, 2, 2, 18)
        params = sum(p.numel() for p in module.parameters()) / 1e9
        assert 1.35 < params < 1.45, params
        assert parts["trainer"].num_devices == 8
    finally:
        finish_wandb(parts["loggers"])


def test_imagenet256_latent_starts(tmp_path: Path, rgb_autoencoder: Path) -> None:
    """The experiment's own stack, recipe and callbacks on CPU for one batch: a narrower
    network (width 64, deep block of 2) so that it fits a test; the on-the-fly encoder."""
    cfg = compose_train(tmp_path, [
        "experiment=imagenet256_latent", "data=fake", "data.img_size=64", "data.latent_size=8",
        "data.num_classes=4", "data.dataset_kwargs.num_classes=4", "data.latents=null",
        "data.batch_size=2", f"model.autoencoder.path={rgb_autoencoder}", "model.channels=64",
        "model.layers_per_block=[1,1,1,1,1,2]", "trainer=cpu", "debug=fast_dev_run",
        "logger=csv", "trainer.enable_progress_bar=false", "~callbacks.progress_bar"])
    metrics = train(cfg)["metrics"]
    assert torch.isfinite(torch.tensor([metrics["val/latent_nll"], metrics["train/loss"]])).all()
    assert metrics["sampling/images"] == 8  # debug=fast_dev_run's sampling round, decoded
