"""A latent model through the whole framework: encode -> train on latents -> validation samples
decoded for the grid and FID (with an injected small extractor) -> checkpoint that records the
autoencoder -> tarflow-sample / -eval / -bench decoding without extra flags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tarflow.cli import bench, encode, evaluate, sample
from tarflow.cli.train import train
from tarflow.data import DataError
from tarflow.lit.callbacks.sampling import SamplingCallback
from tarflow.lit.module import TarFlowLitModule
from tarflow.model import TarFlow, describe_checkpoint
from tarflow.model.autoencoder import AutoencoderError, resolve_autoencoder
from tests.conftest import save_tiny_autoencoder
from tests.integration.conftest import compose_train
from tests.integration.test_latent_encode import compose_encode, encode_overrides
from tests.integration.test_sample_eval_cli import compose_cfg
from tests.integration.test_sampling_callback import TinyExtractor

SPY = f"{__name__}.ShapeSpy"
SAMPLING = {"num_samples": 6, "grid_size": 4, "probe_size": 8, "reference_size": 8,
            "batch_size": 3, "fid_batch_size": 4}


class ShapeSpy(TinyExtractor):
    """The tests' small feature extractor, recording the shape of every batch it scores."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(images.shape[1:]))
        return super().forward(images)


def train_overrides(tmp: Path, autoencoder: Path, latents: Path | None) -> list[str]:
    """experiment=demo_latent shrunk to 8x8x1 fake images (4x4x4 latents) and a tiny flow."""
    return [
        "experiment=demo_latent", "data=fake", "data.img_size=8", "data.channels=1",
        "data.num_classes=3", "data.dataset_kwargs.num_classes=3", "data.latent_size=4",
        "data.latent_channels=4", "data.train_kwargs.length=20", "data.val_kwargs.length=6",
        "data.batch_size=4", "data.val_batch_size=6", f"data.latents={latents or 'null'}",
        f"model.autoencoder.path={autoencoder}", "model.autoencoder.chunk_size=4",
        "model.channels=32", "model.head_dim=16", "model.num_blocks=2",
        "model.layers_per_block=1", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "~callbacks.progress_bar", "logger=csv", "final_samples.per_class=2",
        *[f"callbacks.sampling.{k}={v}" for k, v in SAMPLING.items()],
        f"+callbacks.sampling.extractor={{_target_:{SPY}}}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """Encode the fake images with a tiny autoencoder, then train a latent flow on them."""
    tmp = tmp_path_factory.mktemp("latent")
    autoencoder = save_tiny_autoencoder(tmp / "ae")  # this module may move it (test below)
    latents = tmp / "latents"
    encode.run(compose_encode(encode_overrides(tmp, autoencoder, latents)))
    result = train(compose_train(tmp, train_overrides(tmp, autoencoder, latents)))
    callback = next(cb for cb in result["trainer"].callbacks if isinstance(cb, SamplingCallback))
    return {"tmp": tmp, "autoencoder": autoencoder, "latents": latents, "result": result,
            "extractor": callback.extractor, "ckpt": Path(result["last_ckpt"])}


def test_trains_on_latents_and_validates_on_decoded_images(run) -> None:
    metrics = run["result"]["metrics"]
    assert np.isfinite(metrics["val/latent_nll"])  # the latent NLL, labelled as such ...
    assert "val/bpd" not in metrics and "val/nll" not in metrics  # ... and no pixel bpd
    assert np.isfinite(metrics["val/fid_6"]) and "blocks/crm_share/1" in metrics
    # Every batch the extractor saw (8 real references, 6 samples) was an 8x8x1 image, so the
    # samples reached FID decoded, never as 4x4x4 latents.
    shapes = run["extractor"].shapes
    assert shapes and set(shapes) == {(1, 8, 8)} and len(shapes) == 2 + 2
    out = Path(run["result"]["output_dir"])
    grids = list(out.rglob("media/samples_grid_*.png"))
    assert len(grids) == 1 and (out / "samples_final.png").is_file()
    final = Image.open(out / "samples_final.png")
    # 3 classes x 2 decoded 8x8 images, 2px pads, enlarged 8x (to 64 px cells) to be seen.
    assert final.size == ((2 * 10 + 2) * 8, (3 * 10 + 2) * 8)


def test_checkpoint_records_the_autoencoder(run) -> None:
    record = resolve_autoencoder({"path": str(run["autoencoder"]), "chunk_size": 4})
    summary = describe_checkpoint(run["ckpt"])
    assert summary.autoencoder == record.to_dict()
    net = TarFlow.from_checkpoint(run["ckpt"])  # the flow alone: a TarFlow over latents
    assert (net.config.img_size, net.config.in_channels) == (4, 4)
    module = TarFlowLitModule.load_from_checkpoint(run["ckpt"], map_location="cpu")
    assert module.space.latent and module.space.record == record
    assert module.space.decode(torch.zeros(1, 4, 4, 4)).shape == (1, 1, 8, 8)


def test_sample_and_eval_decode_transparently(run, tmp_path: Path) -> None:
    ckpt = run["ckpt"]
    out = sample.run(compose_cfg("sample", tmp_path, [
        f"ckpt_path={ckpt}", "num_samples=3", "batch_size=2", "format=both",
        f"out_dir={tmp_path / 'samples'}"]))
    assert out["decode_seconds"] > 0 and out["autoencoder"]["fingerprint"]
    png = Image.open(tmp_path / "samples" / "samples" / "000000.png")
    assert png.size == (8, 8) and png.mode == "L"
    assert np.load(tmp_path / "samples" / "samples.npz")["arr_0"].shape == (3, 8, 8, 1)
    ev = evaluate.run(compose_cfg("eval", tmp_path, [
        f"ckpt_path={ckpt}", "fid.num_samples=4", "fid.batch_size=2", "fid.reference_size=8",
        "data.max_images=6",
        f"fid.extractor={{_target_:{SPY}}}", "sampler=jacobi", f"out_dir={tmp_path / 'eval'}"]))
    assert np.isfinite(ev["val/latent_nll"]) and "val/bpd" not in ev
    assert ev["latent_nll_images"] == 6 and np.isfinite(ev["val/fid_4"])
    assert ev["seconds"]["decode"] > 0 and ev["fid_reference"]["img_size"] == 8


def test_bench_times_latent_sampling_and_states_the_decode_cost(run, tmp_path: Path,
                                                                capsys) -> None:
    report = tmp_path / "bench.json"
    bench.main([str(run["ckpt"]), "--batch", "2", "--methods", "jacobi", "--repeats", "1",
                "--warmup", "0", "--tol", "1e-5", "--plan-cache", "", "--json", str(report)])
    printed = capsys.readouterr().out
    assert "sampling is timed in latent space, decoding separately" in printed
    assert "decode (autoencoder, not in the times above): batch 2:" in printed
    data = json.loads(report.read_text())
    assert data["decode"][0]["batch"] == 2 and data["decode"][0]["seconds"] > 0
    assert {r["method"] for r in data["rows"]} == {"sequential", "jacobi"}


def test_a_missing_autoencoder_is_refused_and_a_copy_can_stand_in(run, tmp_path: Path) -> None:
    moved = run["tmp"] / "ae_moved"
    shutil.move(run["autoencoder"], moved)
    try:
        args = [f"ckpt_path={run['ckpt']}", "num_samples=2", f"out_dir={tmp_path / 's'}"]
        with pytest.raises(AutoencoderError, match="is not on this machine: pass "
                                                   "autoencoder_path="):
            sample.run(compose_cfg("sample", tmp_path, args))
        assert not (tmp_path / "s").exists()  # refused before anything was written
        out = sample.run(compose_cfg("sample", tmp_path, [*args, f"autoencoder_path={moved}"]))
        assert out["num_samples"] == 2
        other = save_tiny_autoencoder(tmp_path / "other", seed=3)
        with pytest.raises(AutoencoderError, match="other weights would decode"):
            sample.run(compose_cfg("sample", tmp_path, [
                *args[:2], f"out_dir={tmp_path / 't'}", f"autoencoder_path={other}"]))
    finally:
        shutil.move(moved, run["autoencoder"])


def test_latents_of_another_autoencoder_are_refused(run, tmp_path: Path) -> None:
    other = save_tiny_autoencoder(tmp_path / "other", seed=1)
    cfg = compose_train(tmp_path, train_overrides(tmp_path, other, run["latents"]))
    with pytest.raises(DataError, match="do not match this run: autoencoder fingerprint="):
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused at start-up: no run directory


def test_encodes_on_the_fly_without_a_latents_directory(run, tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, [*train_overrides(tmp_path, run["autoencoder"], None),
                                   "debug=fast_dev_run"])
    result = train(cfg)
    assert np.isfinite(result["metrics"]["val/latent_nll"])
    assert "sampling/iters_total" in result["metrics"]  # the round ranked encoded images


def test_a_pixel_checkpoint_callback_metric_is_refused_for_latent_models(run,
                                                                         tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, [*train_overrides(tmp_path, run["autoencoder"], None),
                                   "callbacks.model_checkpoint.monitor=val/nll"])
    with pytest.raises(ValueError, match="monitor=val/latent_nll"):
        train(cfg)


def test_a_resume_with_another_autoencoder_is_refused(run, tmp_path: Path) -> None:
    other = save_tiny_autoencoder(tmp_path / "other", seed=2)
    overrides = train_overrides(tmp_path, other, None)
    cfg = compose_train(tmp_path, [*overrides, f"ckpt_path={run['ckpt']}"])
    with pytest.raises(ValueError, match="does not fit this run's model: model.autoencoder: "
                                         f"{other}"):
        train(cfg)

