"""tarflow-sample, tarflow-eval, the hparams_search sweeps and scripts/prepare_fid_stats.py."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tarflow.cli import evaluate, sample
from tarflow.conf import CONFIG_DIR
from tarflow.data import build_dataset
from tarflow.eval.likelihood import bits_per_dim
from tarflow.model import TarFlow, TarFlowConfig
from tarflow.sampling import build_schedule
from tarflow.sampling import sample as ring1_sample
from tarflow.sampling.sample_set import fixed_inputs
from tarflow.sampling.settings import parse_sampler
from tests.integration.test_sampling_callback import TinyExtractor
from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[2]
CONF = Path(CONFIG_DIR)
EXTRACTOR = f"{TinyExtractor.__module__}.TinyExtractor"
# A 4-block conditional model, so the demo-sized schedules of the sweep grid apply.
CONFIG = TarFlowConfig(img_size=8, in_channels=1, patch_size=2, channels=32, num_blocks=4,
                       layers_per_block=1, num_classes=3, head_dim=16, noise_std=0.05)
FAKE = ["data.name=fake", "+data.dataset_kwargs.length=40", "+data.dataset_kwargs.num_classes=3"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = TarFlow(CONFIG)
    for block in net.blocks:  # a fresh TarFlow is the identity map
        nn.init.normal_(block.proj_out.weight, std=0.05)
    return net.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


def compose_cfg(name: str, tmp_path: Path, overrides: list[str], *,
                hydra_node: bool = False) -> DictConfig:
    GlobalHydra.instance().clear()
    # An evaluation's W&B run costs seconds; tests/integration/test_eval_ranks.py checks it.
    quiet = ["log.wandb=false"] if name == "eval" else []
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(name, overrides=[f"paths.root_dir={tmp_path}",
                                        f"paths.output_dir={tmp_path / 'out'}", "device=cpu",
                                        "progress=false", *quiet, *overrides],
                       return_hydra_config=hydra_node)


def test_sample_writes_pngs_npz_grid_and_summary(tmp_path: Path, checkpoint: Path) -> None:
    cfg = compose_cfg("sample", tmp_path, [f"ckpt_path={checkpoint}", "num_samples=3",
                                           "batch_size=2", "format=both", "sampler=jacobi",
                                           "sampler.schedule=jacobi:3"])
    result = sample.run(cfg)
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"{i:06d}.png"
                                                                   for i in range(3)]
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (3, 8, 8, 1) and npz["arr_0"].dtype == np.uint8
    assert npz["indices"].tolist() == list(range(3))
    assert set(npz["arr_1"].tolist()) <= {0, 1, 2}
    assert (out / "grid.png").is_file()
    summary = json.loads((out / "sample_summary.json").read_text())
    assert summary["num_samples"] == 3 and summary["schedule"] == "jacobi:3"
    assert set(summary["iters_per_block"]) == {"0", "1", "2", "3"}
    assert result["seconds_per_image"] > 0
    # Sample i is the validation set's member i: the same noise and label, whatever the batching.
    net = TarFlow.from_checkpoint(checkpoint)
    noise, y = fixed_inputs(net, [2], seed=0)
    assert int(npz["arr_1"][2]) == int(y[0])
    alone = ring1_sample(net, noise, y, build_schedule("jacobi:3"))[0]
    pixels = ((alone[0, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert np.abs(pixels.astype(int) - npz["arr_0"][2, ..., 0].astype(int)).max() <= 1


def test_sample_auto_schedule_ranks_a_probe_batch(tmp_path: Path, checkpoint: Path,
                                                 capsys) -> None:
    cfg = compose_cfg("sample", tmp_path, [
        f"ckpt_path={checkpoint}", "num_samples=3", "format=npz", "sampler=gs_jacobi_auto",
        "sampler.auto.tough_factor=1.0", "probe.dataset=fake", "probe.size=16",
        "+probe.dataset_kwargs.length=20", "label=2", "sampler.guidance=1.0"])
    result = sample.run(cfg)
    out = capsys.readouterr().out
    assert "sampling plan at batch 3" in out and "prior: 16 fake images" in out
    assert "planned in" in out and "seq" in out  # the table lists the sequential candidate
    assert result["plan"]["schedule"] == result["schedule"]
    assert result["speedup_vs_planned_sequential"] > 0
    assert np.load(tmp_path / "out" / "samples.npz")["arr_1"].tolist() == [2, 2, 2]
    # The same weights, device, batch and settings: the plan comes from the cache, unranked.
    cfg.out_dir = str(tmp_path / "again")
    result = sample.run(cfg)
    out = capsys.readouterr().out
    assert "reused from cache" in out and "prior: cached plan" in out
    paper = sample.run(compose_cfg("sample", tmp_path, [
        f"ckpt_path={checkpoint}", "num_samples=3", "format=npz", "sampler=gs_jacobi_auto",
        "sampler.schedule=auto:paper", "sampler.auto.tough_factor=1.0", "probe.dataset=fake",
        "probe.size=16", "+probe.dataset_kwargs.length=20", "sampler.guidance=1.0",
        f"out_dir={tmp_path / 'paper'}"]))
    assert "automatic schedule (auto:paper, ranked on 16 fake images)" in capsys.readouterr().out
    assert paper["schedule"].startswith("{")  # the paper's rule: tough blocks got segments


def test_sample_console_entry_point(tmp_path: Path, checkpoint: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "tarflow.cli.sample", f"ckpt_path={checkpoint}", "num_samples=2",
         "device=cpu", "progress=false", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((run_dir / "samples").glob("*.png"))) == 2
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_eval_bpd_and_fid(tmp_path: Path, checkpoint: Path) -> None:
    common = [f"ckpt_path={checkpoint}", *FAKE, "fid.num_samples=8", "fid.batch_size=4",
              "fid.reference_size=16", f"fid.extractor={{_target_:{EXTRACTOR}}}",
              "sampler=gs_jacobi", "sampler.schedule='[3-4-8-10]'"]
    first = evaluate.run(compose_cfg("eval", tmp_path, [*common, "data.batch_size=3"]))
    stats = tmp_path / "data" / "fid_stats" / "fake_8px_c1_train16.npz"
    assert stats.is_file()  # the shared cache name, image size filled in from the checkpoint
    assert 0 < first["val/bpd"] < 20 and first["bpd_images"] == 40
    assert 0 <= first["val/fid_8"] < float("inf")
    assert first["schedule"] == "[3-4-8-10]" and first["seconds_per_image"] > 0
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["val/fid_8"] == first[
        "val/fid_8"]
    # bpd does not depend on the batch size: image j's dequantisation noise is seeded by j.
    net = TarFlow.from_checkpoint(checkpoint)
    data = build_dataset("fake", img_size=8, split="val", channels=1, length=40, num_classes=3)
    by_7 = bits_per_dim(net, data, batch_size=7)["val/bpd"]
    assert by_7 == pytest.approx(first["val/bpd"], rel=1e-6)


@pytest.mark.parametrize("search", ["gs_jacobi_grid", "guidance_grid"])
def test_hparams_search_values_build_valid_samplers(tmp_path: Path, search: str) -> None:
    cfg = compose_cfg("eval", tmp_path, ["ckpt_path=x", f"hparams_search={search}"],
                      hydra_node=True)
    params = cfg.hydra.sweeper.params
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and not cfg.bpd.enabled
    parser = OverridesParser.create()
    grid = {key.split(".", 1)[1]: parser.parse_override(f"{key}={spec}").value().list
            for key, spec in params.items()}
    assert all(len(values) >= 2 for values in grid.values() if len(grid) == 1)
    base = OmegaConf.to_container(cfg.sampler, resolve=True)
    for combo in itertools.product(*grid.values()):
        settings = parse_sampler({**base, **dict(zip(grid, combo, strict=True))})
        if not settings.is_auto:  # every schedule fits the 4-block demo-sized model
            settings.schedule.validate(CONFIG.num_blocks, CONFIG.num_patches)


@pytest.mark.slow
def test_gs_jacobi_sweep_runs(tmp_path: Path, checkpoint: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tarflow.cli.evaluate", "hparams_search=gs_jacobi_grid",
         f"ckpt_path={checkpoint}", *FAKE, "fid.num_samples=4", "fid.reference_size=8",
         f"fid.extractor={{_target_:{EXTRACTOR}}}", "device=cpu", "progress=false",
         f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
         "hydra.sweeper.params={sampler.schedule:'choice(jacobi,\"[3-8-16-10]\")',"
         "sampler.tol:'choice(1e-3)'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/eval.json"))]
    assert [r["schedule"] for r in results] == ["jacobi", "[3-8-16-10]"]


def _load_script():
    return load_script("prepare_fid_stats")


def test_prepare_fid_stats_writes_the_cache_others_read(tmp_path: Path, capsys) -> None:
    from tarflow.eval import default_weights_path

    if not default_weights_path().is_file():
        pytest.skip("no Inception weights installed")
    script = _load_script()
    args = ["--dataset", "fake", "--img-size", "8", "--channels", "1", "--count", "3",
            "--out-dir", str(tmp_path), "--no-progress", "--batch-size", "3"]
    assert script.main(args) == 0
    path = tmp_path / "fake_8px_c1_train3.npz"
    assert path.is_file()
    from tarflow.eval import FeatureStats

    stats = FeatureStats.load(path, expect={"extractor": "inception-v3-compat", "split": "train",
                                            "count": 3, "img_size": 8, "channels": 1,
                                            "dataset": "fake", "subset_seed": 0})
    assert stats.count == 3 and stats.num_features == 2048
    assert script.main(["--dataset", "nope", "--img-size", "8"]) == 2
    assert "error:" in capsys.readouterr().err
