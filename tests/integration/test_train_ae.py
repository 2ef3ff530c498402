"""``tarflow-train-ae``: a small autoencoder for the latent demo, saved where a user's
``model.autoencoder.path`` reads it, with scale and shift that whiten its latents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tarflow.cli import train_ae
from tarflow.data import build_dataset
from tarflow.model.autoencoder import Autoencoder, resolve_autoencoder
from tarflow.model.autoencoder_fit import fit, reconstruction_error


def test_trains_saves_and_whitens_the_latents(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ae"
    args = ["--steps", "40", "--widths", "8", "16", "--batch-size", "32", "--out", str(out),
            "--no-progress"]
    assert train_ae.main(args) == 0
    assert "saved to" in capsys.readouterr().out
    report = json.loads((out / "training.json").read_text())
    record = resolve_autoencoder({"path": str(out)})  # the user's path to it
    assert record.scaling_factor == pytest.approx(report["scaling_factor"])
    assert record.shift_factor == pytest.approx(report["shift_factor"])
    assert (record.latent_channels, record.downsample, record.image_channels) == (4, 2, 1)
    # Its own scale and shift give the training digits' latents mean 0 and variance 1.
    images = train_ae._images("demo", None, 16, 1, "train")
    z = Autoencoder.load(record).encode(images)
    assert abs(float(z.mean())) < 1e-3 and float(z.std()) == pytest.approx(1.0, abs=1e-3)
    assert report["final_loss"] < 0.5 * report["first_loss"]  # it learnt something


def test_refuses_to_overwrite_without_force(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ae"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as err:
        train_ae.main(["--steps", "1", "--out", str(out)])
    assert err.value.code == 2 and "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_fit_lowers_the_reconstruction_error() -> None:
    from tarflow.model.autoencoder import small_autoencoder

    fake = build_dataset("fake", img_size=8, channels=1, length=64)  # smooth images
    images = torch.stack([fake[i][0] for i in range(64)])
    vae = small_autoencoder(widths=(8, 16), sample_size=8)
    before = reconstruction_error(vae, images)
    fit(vae, images, steps=80, batch_size=16, lr=5e-3, kl_weight=1e-4)
    assert reconstruction_error(vae, images) < 0.4 * before  # ~0.25-0.3 seen
