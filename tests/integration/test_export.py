"""``tarflow-export``: official-format files that load back and give the same z, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from tarflow.cli.export import main as export_main
from tarflow.lit.datamodule import TarFlowDataModule
from tarflow.lit.ema import EMA
from tarflow.lit.module import TarFlowLitModule
from tarflow.model import TarFlow
from tarflow.model.official import block_shapes, official_problems
from tests.reliability.helpers import assert_one_line_error, call_main

# The smallest shape the official model can express: 64-wide heads, 4x MLP, equal blocks.
MODEL = dict(img_size=8, in_channels=1, patch_size=2, channels=64, num_blocks=2,
             layers_per_block=2, num_classes=3, head_dim=64, noise_std=0.05)
OFFICIAL = "fake_model_2_64_2_2_0.05.pth"


def _fit(root: Path, *, ema: bool) -> Path:
    """A two-step run of the real module (with or without EMA); returns its last.ckpt."""
    torch.manual_seed(0)
    module = TarFlowLitModule(MODEL, optim={"lr": 1e-2, "warmup_steps": 0},
                              data={"name": "fake", "img_size": 8, "channels": 1})
    for block in module.net.blocks:  # a fresh TarFlow is the identity: make z depend on weights
        nn.init.normal_(block.proj_out.weight, std=0.05)
    data = TarFlowDataModule("fake", img_size=8, channels=1, num_classes=3, batch_size=8,
                             persistent_workers=False, dataset_kwargs={"num_classes": 3},
                             train_kwargs={"length": 16}, val_kwargs={"length": 8})
    callbacks = [ModelCheckpoint(dirpath=root, save_last=True)]
    if ema:
        callbacks.append(EMA(decay=0.5, warmup=0))
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
              callbacks=callbacks, default_root_dir=root).fit(module, data)
    return root / "last.ckpt"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fit(tmp_path_factory.mktemp("export_run"), ema=True)


def _z(net: TarFlow) -> torch.Tensor:
    x = torch.linspace(-1, 1, 2 * 64).reshape(2, 1, 8, 8)
    return net.eval()(x, torch.tensor([0, 2])).z


def _raw_net(path: Path) -> TarFlow:
    obj = torch.load(path, weights_only=True)
    return TarFlow.from_checkpoint({"state_dict": obj["current_model_state"],
                                    "hyper_parameters": obj["hyper_parameters"]})


def test_export_round_trips_ema_and_raw_weights(ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "exports"
    result = call_main(export_main, ["tarflow-export", str(ckpt), f"{out}/"], capsys)
    assert result.code == 0, result.err
    path = out / OFFICIAL
    state = torch.load(path, weights_only=True)
    ema = TarFlow.from_checkpoint(ckpt)  # a checkpoint's state_dict holds the EMA weights
    # Exactly the official key set (no prefix, no Lightning entries): a plain state dict.
    assert set(state) == set(ema.state_dict())
    loaded = TarFlow.from_checkpoint(path)  # the architecture read from name and shapes
    assert loaded.config.to_dict() == ema.config.to_dict()
    assert torch.equal(_z(loaded), _z(ema))
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["weights"] == "ema" and record["dataset"] == "fake"
    assert record["architecture"]["channels"] == 64 and record["global_step"] == 2

    raw_path = tmp_path / "raw.pth"
    result = call_main(export_main, ["tarflow-export", str(ckpt), str(raw_path), "--weights",
                                     "raw"], capsys)
    assert result.code == 0, result.err
    assert f"official name is {OFFICIAL}" in result.out
    raw = TarFlow.from_checkpoint(raw_path, patch_size=2, noise_std=0.05)
    assert torch.equal(_z(raw), _z(_raw_net(ckpt)))
    assert not torch.equal(_z(raw), _z(ema))  # the choice mattered: EMA differs from raw


def test_export_never_replaces_files_unless_forced(ckpt: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "model.pth"
    target.write_bytes(b"precious")
    result = call_main(export_main, ["tarflow-export", str(ckpt), str(target)], capsys)
    assert_one_line_error(result, "already exist", "--force")
    assert target.read_bytes() == b"precious" and not target.with_suffix(".json").exists()
    result = call_main(export_main, ["tarflow-export", str(ckpt), str(target), "--force"], capsys)
    assert result.code == 0 and set(torch.load(target, weights_only=True)) >= {"var"}


def test_export_refuses_what_the_official_model_cannot_express(
        ckpt: Path, tmp_path: Path, capsys) -> None:
    state = TarFlow.from_checkpoint(ckpt).state_dict()
    # Deep-shallow: block 0 keeps one layer, block 1 two (shapes only; no config field).
    shallow = {k: v for k, v in state.items() if not k.startswith("blocks.0.attn_blocks.1.")}
    assert [s["layers"] for s in block_shapes(shallow)] == [1, 2]
    path = tmp_path / "fake_model_2_64_2_2_0.05.pth"
    torch.save(shallow, path)
    result = call_main(export_main, ["tarflow-export", str(path), str(tmp_path / "o/")], capsys)
    assert_one_line_error(result, "cannot be exported", "blocks differ in depth",
                          "0: 1, 1: 2", "deep-shallow")
    assert not (tmp_path / "o").exists()

    wide = dict(state)  # a wider deep block: proj_in (and everything after it) of another width
    wide["blocks.1.proj_in.weight"] = torch.zeros(128, 4)
    assert any("width" in p for p in official_problems(wide, None))
    # Options shapes cannot show come from the stored config.
    assert any("head_dim=16" in p for p in official_problems(state, {"head_dim": 16}))
    assert any("cond_deep_only" in p
               for p in official_problems(state, {"cond_deep_only": True}))
    assert official_problems(state, {**MODEL, "expansion": 4}) == []

    no_ema = _fit(tmp_path / "no_ema", ema=False)
    result = call_main(export_main, ["tarflow-export", str(no_ema), str(tmp_path / "x.pth"),
                                     "--weights", "ema"], capsys)
    assert_one_line_error(result, "no EMA weights")
    result = call_main(export_main, ["tarflow-export", str(ckpt), str(tmp_path / "x.txt")],
                       capsys)
    assert_one_line_error(result, "neither a directory nor a .pth file")


def test_a_latent_models_export_names_its_autoencoder(ckpt: Path, tmp_path: Path,
                                                      capsys) -> None:
    """The flow of a latent model goes out alone; the JSON beside it carries the autoencoder
    record its latents need, and the command says so."""
    obj = torch.load(ckpt, weights_only=True)
    record = {"path": "/models/ae", "fingerprint": "abc", "latent_channels": 1}
    obj["tarflow"]["autoencoder"] = record
    latent = tmp_path / "latent.ckpt"
    torch.save(obj, latent)
    assert export_main([str(latent), str(tmp_path / "out") + "/"]) == 0
    assert "a latent model" in capsys.readouterr().out
    (pth,) = (tmp_path / "out").glob("*.pth")
    assert json.loads(pth.with_suffix(".json").read_text())["autoencoder"] == record
