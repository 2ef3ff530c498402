"""The frozen autoencoder of latent models and the pixel / latent spaces (ring 1).

Every autoencoder here is a small random ``AutoencoderKL`` saved with ``save_pretrained`` and
loaded back through ``model.autoencoder.path``, the path a user's configuration takes.
"""

from __future__ import annotations

import copy
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tarflow.model import TarFlowConfig
from tarflow.model.autoencoder import (
    Autoencoder,
    AutoencoderError,
    locate,
    resolve_autoencoder,
)
from tarflow.model.space import LatentSpace, PixelSpace, make_space
from tests.conftest import save_tiny_autoencoder

FLOW = TarFlowConfig(img_size=4, in_channels=4, patch_size=2, channels=32, num_blocks=2,
                     layers_per_block=1, head_dim=16)


def images(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_loads_frozen_in_eval_mode_with_its_own_scale(tiny_autoencoder: Path) -> None:
    record = resolve_autoencoder({"path": str(tiny_autoencoder)})
    config = json.loads((tiny_autoencoder / "config.json").read_text())
    assert record.scaling_factor == config["scaling_factor"] == 0.18215  # diffusers' default
    assert record.shift_factor == 0.0 and record.encode == "mean"
    assert (record.latent_channels, record.image_channels, record.downsample) == (4, 1, 2)
    ae = Autoencoder.load(record)
    ae.train()  # what a LightningModule does to its children every epoch
    assert not ae.vae.training and not any(p.requires_grad for p in ae.parameters())
    z = ae.encode(images())
    assert z.shape == (5, 4, 4, 4) and z.dtype == torch.float32
    x = ae.decode(z)
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32


def test_scale_and_shift_are_applied_and_undone(tiny_autoencoder: Path) -> None:
    ae = Autoencoder.load({"path": str(tiny_autoencoder), "scaling_factor": 0.5,
                           "shift_factor": 0.25})
    x = images()
    with torch.no_grad():
        mean = ae.vae.encode(x).latent_dist.mean
        raw = ae.vae.decode(mean).sample
    z = ae.encode(x)
    torch.testing.assert_close(z, (mean - 0.25) * 0.5)
    torch.testing.assert_close(ae.decode(z), raw, atol=1e-5, rtol=1e-5)


def test_mean_is_deterministic_and_sample_draws_from_the_posterior(tiny_autoencoder: Path) -> None:
    ae = Autoencoder.load({"path": str(tiny_autoencoder)})
    x = images()
    torch.testing.assert_close(ae.encode(x), ae.encode(x), rtol=0, atol=0)
    a = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    b = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - ae.encode(x)).abs().mean() > 1e-3
    sampling = Autoencoder.load({"path": str(tiny_autoencoder), "encode": "sample"})
    assert (sampling.encode(x) - ae.encode(x)).abs().mean() > 1e-3  # the record's mode


def test_chunks_give_the_same_result_and_dtypes_round_trip(tiny_autoencoder: Path) -> None:
    whole = Autoencoder.load({"path": str(tiny_autoencoder), "chunk_size": 64})
    chunked = Autoencoder.load({"path": str(tiny_autoencoder), "chunk_size": 2})
    x = images(7)
    torch.testing.assert_close(chunked.encode(x), whole.encode(x), atol=1e-6, rtol=1e-5)
    z = whole.encode(x)
    torch.testing.assert_close(chunked.decode(z), whole.decode(z), atol=1e-6, rtol=1e-5)
    low = Autoencoder.load({"path": str(tiny_autoencoder), "dtype": "bfloat16"})
    assert low.dtype == torch.bfloat16
    assert low.encode(x).dtype == torch.float32 and low.decode(z.double()).dtype == torch.float64


def test_missing_or_wrong_paths_say_how_to_get_weights(tmp_path: Path, tiny_autoencoder: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AutoencoderError, match="does not exist.*tarflow-train-ae.*hf download"):
        resolve_autoencoder({"path": str(tmp_path / "nowhere" / "ae")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(AutoencoderError, match="not a diffusers AutoencoderKL directory"):
        resolve_autoencoder({"path": str(tmp_path / "empty")})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AutoencoderError, match="neither a local directory nor a Hugging Face model "
                                               "in the local cache"):
        resolve_autoencoder({"path": "someone/no-such-vae"})
    unet = tmp_path / "unet"
    shutil.copytree(tiny_autoencoder, unet)
    config = json.loads((unet / "config.json").read_text())
    (unet / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    with pytest.raises(AutoencoderError, match="holds a UNet2DModel, not an AutoencoderKL"):
        resolve_autoencoder({"path": str(unet)})
    with pytest.raises(AutoencoderError, match="encode='median'"):
        resolve_autoencoder({"path": str(tiny_autoencoder), "encode": "median"})
    with pytest.raises(AutoencoderError, match="unknown model.autoencoder option"):
        resolve_autoencoder({"path": str(tiny_autoencoder), "scale": 0.2})


def test_fingerprint_follows_the_weights_not_the_files(tmp_path: Path,
                                                       tiny_autoencoder: Path) -> None:
    record = resolve_autoencoder({"path": str(tiny_autoencoder)})
    copy_dir = shutil.copytree(tiny_autoencoder, tmp_path / "copy")
    assert resolve_autoencoder({"path": str(copy_dir)}).fingerprint == record.fingerprint
    assert locate(record, str(copy_dir)) == copy_dir  # a copy elsewhere may stand in
    other = save_tiny_autoencoder(tmp_path / "other", seed=1)
    assert resolve_autoencoder({"path": str(other)}).fingerprint != record.fingerprint
    with pytest.raises(AutoencoderError, match="fingerprint .* other weights would decode"):
        locate(record, str(other))
    moved = record.__class__(**{**record.to_dict(), "path": str(tmp_path / "gone")})
    with pytest.raises(AutoencoderError, match="is not on this machine: pass autoencoder_path="):
        locate(moved)


def test_spaces(tiny_autoencoder: Path) -> None:
    pixels = make_space(TarFlowConfig(img_size=8, in_channels=1, patch_size=2, channels=32,
                                      num_blocks=2, layers_per_block=1, head_dim=16), None)
    assert isinstance(pixels, PixelSpace) and not pixels.latent
    x = images()
    assert pixels.flow_inputs(x) is x and pixels.decode(x) is x
    space = make_space(FLOW, {"path": str(tiny_autoencoder)})
    assert isinstance(space, LatentSpace) and space.latent
    assert space.flow_shape == (4, 4, 4) and space.image_shape == (1, 8, 8)
    z = space.flow_inputs(x)  # images are encoded ...
    assert z.shape == (5, 4, 4, 4) and space.flow_inputs(z) is z  # ... latents pass through
    assert space.decode(z).shape == (5, 1, 8, 8)
    with pytest.raises(ValueError, match="neither latents"):
        space.flow_inputs(torch.zeros(2, 3, 8, 8))
    assert copy.deepcopy(space) is space  # EMA's copy of the module shares the frozen network
    clone = pickle.loads(pickle.dumps(space))  # spawned processes get the record, not weights
    assert clone._autoencoder is None and clone.record == space.record
    torch.testing.assert_close(clone.decode(z), space.decode(z))
    with pytest.raises(ValueError, match="latents have 4 channels"):
        make_space(FLOW.replace(in_channels=3, patch_size=1), {"path": str(tiny_autoencoder)})
