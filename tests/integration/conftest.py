"""Shared helpers for the Hydra + Lightning integration tests (CPU, offline, under tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from tarflow.conf import CONFIG_DIR

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = Path(CONFIG_DIR)
EXPERIMENTS = ("demo", "img64_uncond", "img64_cond", "img128_cond", "afhq256_cond",
               "demo_deep_shallow", "img64_deep_shallow")

# A tiny unconditional model on 8x8x1 fake images: 4 training steps per epoch, no progress bar.
TINY = [
    "data=fake",
    "model=tiny",
    "trainer=cpu",
    "data.img_size=8",
    "data.channels=1",
    "data.num_classes=0",
    "data.batch_size=8",
    "data.train_kwargs.length=32",
    "data.val_kwargs.length=8",
    "~callbacks.progress_bar",
    "~callbacks.sampling",  # real-Inception FID is too slow here; tests add it back explicitly
    "sampler.guidance=0.0",  # the demo's guidance needs a conditional model
    "sampler.denoise=0.0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "final_samples.enabled=false",
]


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network, no key, and no W&B files outside tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))


def compose_train(tmp_path: Path, overrides: list[str], run: str = "run") -> DictConfig:
    """The ``train`` config with paths pinned under ``tmp_path`` (no Hydra run dir needed)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(
            "train",
            overrides=[
                f"paths.root_dir={tmp_path}",
                f"paths.output_dir={tmp_path / run}",
                *overrides,
            ],
        )


class LossRecorder(L.Callback):
    """Records the training loss of every optimiser step; writes JSON at the end of fit.

    Args:
        path: JSON file ``{global_step: loss}`` (step counted after the update, from 1).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = path
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])

    def on_train_end(self, trainer, pl_module) -> None:
        if self.path is not None and trainer.is_global_zero:
            Path(self.path).write_text(json.dumps(self.losses))


class StopAfterEpochs(L.Callback):
    """Interrupts fit after ``epochs`` epochs without changing max_epochs (so the LR schedule
    of the interrupted run equals the uninterrupted one)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class SaveNetWeights(L.Callback):
    """Rank zero writes the raw network weights after fit (the parent process of a ddp_spawn
    fit never sees the trained module)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            torch.save(
                {k: v.detach().cpu() for k, v in pl_module.net.state_dict().items()}, self.path
            )
