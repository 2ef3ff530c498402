"""Every experiment composes and instantiates; config groups stay consistent with ring 1."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import OmegaConf

from tarflow.cli.train import build
from tarflow.lit import TarFlowDataModule, TarFlowLitModule
from tarflow.lit.ema import EMA
from tarflow.lit.wandb_utils import finish_wandb
from tarflow.model import PRESETS, TarFlowConfig, preset
from tarflow.sampling import build_schedule
from tests.integration.conftest import CONF_DIR, EXPERIMENTS, compose_train

# The paper's global batches (ALGORITHMS.md §1); the demo's is its single-device batch.
GLOBAL_BATCH = {
    "img64_uncond": 256,
    "img64_cond": 480,
    "img128_cond": 768,
    "afhq256_cond": 256,
    "demo": 32,
    "demo_deep_shallow": 32,
    "img64_deep_shallow": 480,  # TarFlow img64_cond's recipe
}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_model_matches_preset(tmp_path: Path, experiment: str) -> None:
    """With its real data config, each experiment builds exactly the ring-1 preset."""
    cfg = compose_train(tmp_path, [f"experiment={experiment}"])
    config = TarFlowConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    assert config == preset(experiment)
    assert cfg.module.noise.std == config.noise_std
    devices = cfg.trainer.devices * cfg.trainer.num_nodes
    assert cfg.data.batch_size * devices == GLOBAL_BATCH[experiment]
    if not experiment.startswith("demo"):
        assert cfg.module.optim.lr == 1e-4
        assert cfg.trainer.precision == "bf16-mixed"


MODEL_FILES = sorted(f.stem for f in (CONF_DIR / "model").glob("*.yaml") if f.stem != "base")


def test_every_model_file_has_a_preset() -> None:
    """Presets are defined once: each conf/model file is a ring-1 preset (checked below)."""
    assert MODEL_FILES and set(MODEL_FILES) <= set(PRESETS), set(MODEL_FILES) - set(PRESETS)


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_file_equals_its_preset_field_by_field(tmp_path: Path, name: str) -> None:
    """``model=<name>`` builds exactly ``PRESETS[name]``, every field, noise_std included.

    The files take image size, channels (and, for conditional models, classes) from the data
    config by interpolation, so the data config is given the preset's values first.
    """
    want = PRESETS[name]
    cfg = compose_train(tmp_path, [f"model={name}", "data=fake"])
    data = {"img_size": want.img_size, "channels": want.in_channels,
            "num_classes": want.num_classes, "latent_size": want.img_size,
            "latent_channels": want.in_channels}
    for key, value in data.items():
        OmegaConf.update(cfg, f"data.{key}", value, force_add=True)
    fields = OmegaConf.to_container(cfg.model, resolve=True)
    fields.pop("autoencoder", None)  # latent models: where the autoencoder is, not a shape
    got = TarFlowConfig(**fields)
    differ = {k: (v, getattr(want, k)) for k, v in vars(got).items() if v != getattr(want, k)}
    assert not differ, f"conf/model/{name}.yaml vs PRESETS[{name!r}] (yaml, preset): {differ}"
    assert cfg.module.noise.std == want.noise_std  # what training uses


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_instantiates(tmp_path: Path, experiment: str) -> None:
    """Datamodule (fake data), module, callbacks, loggers and trainer all build on the CPU.

    The paper-size networks are built on the meta device: shapes and parameter counts are
    checked without allocating gigabytes.
    """
    overrides = [
        f"experiment={experiment}",
        "data=fake",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
    ]
    cfg = compose_train(tmp_path, overrides)
    with torch.device("meta"):
        parts = build(cfg)
    try:
        module, dm, trainer = parts["module"], parts["datamodule"], parts["trainer"]
        assert isinstance(module, TarFlowLitModule) and isinstance(dm, TarFlowDataModule)
        assert isinstance(trainer, L.Trainer)
        assert module.net.config.img_size == dm.img_size == 16
        assert module.net.config.in_channels == dm.channels
        cond = experiment != "img64_uncond"
        assert module.net.config.num_classes == (dm.num_classes if cond else 0)
        kinds = [type(cb) for cb in parts["callbacks"]]
        assert any(issubclass(k, ModelCheckpoint) for k in kinds) and EMA in kinds
        assert {type(lg).__name__ for lg in parts["loggers"]} == {"WandbLogger", "RunCSVLogger"}
        if not experiment.startswith("demo"):
            assert isinstance(trainer.strategy, DDPStrategy)
            assert trainer.num_devices == 8
        dm.setup("fit")
        x, y = dm.train_set[0]
        assert x.shape == (dm.channels, 16, 16) and y.dtype == torch.int64
    finally:
        finish_wandb(parts["loggers"])


def test_paper_model_sizes(tmp_path: Path) -> None:
    """Parameter counts of the paper configurations at their real image sizes (meta device)."""
    sizes = {}
    for experiment in EXPERIMENTS[1:]:
        cfg = compose_train(tmp_path, [f"experiment={experiment}"])
        kwargs = OmegaConf.to_container(cfg.module, resolve=True)
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        with torch.device("meta"):
            module = TarFlowLitModule(**kwargs)
        sizes[experiment] = sum(p.numel() for p in module.parameters()) / 1e6
    # 8 blocks x 8 layers x 12 Ch^2 weights dominate: ~453M at Ch=768, ~805M at Ch=1024.
    assert 440 < sizes["img64_uncond"] < 470 and 440 < sizes["afhq256_cond"] < 470
    assert 800 < sizes["img64_cond"] < 830 and 800 < sizes["img128_cond"] < 830


@pytest.mark.parametrize("name", ["sequential", "jacobi", "gs_jacobi", "gs_jacobi_auto"])
def test_sampler_configs_are_plain(name: str) -> None:
    """Sampler files load without Hydra, hold no interpolation, and build a schedule."""
    cfg = OmegaConf.load(CONF_DIR / "sampler" / f"{name}.yaml")
    text = (CONF_DIR / "sampler" / f"{name}.yaml").read_text()
    assert "${" not in text
    assert cfg.name == name
    assert set(cfg.auto) >= {"tough_factor", "tough_segments", "tough_iters", "else_iters"}
    if cfg.schedule != "auto":
        schedule = build_schedule(cfg.schedule, init=cfg.init, tol=cfg.tol)
        schedule.validate(8, 256)


@pytest.mark.parametrize("debug", ["fast_dev_run", "overfit"])
def test_debug_presets_compose(tmp_path: Path, debug: str) -> None:
    cfg = compose_train(tmp_path, [f"debug={debug}"])
    assert cfg.task_name.startswith("debug")


def test_command_line_wins_over_experiment(tmp_path: Path) -> None:
    cfg = compose_train(
        tmp_path,
        [
            "experiment=img128_cond",
            "trainer=cpu",
            "data=fake",
            "trainer.devices=1",
            "module.optim.lr=3e-4",
        ],
    )
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 1
    assert cfg.data.name == "fake" and cfg.module.optim.lr == 3e-4
    assert cfg.model.noise_std == 0.15 and cfg.model.img_size == cfg.data.img_size
