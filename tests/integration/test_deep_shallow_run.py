"""A deep-shallow (STARFlow-style) model through the whole framework: it trains, validates with
the planner's GS-Jacobi schedule, logs its ranking and FID, and samples through every CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tarflow.cli import bench, evaluate, rank, sample
from tarflow.cli.train import train
from tarflow.model import TarFlow
from tests.integration.conftest import TINY, compose_train
from tests.integration.test_sample_eval_cli import compose_cfg
from tests.integration.test_sampling_callback import TinyExtractor

EXTRACTOR = f"{TinyExtractor.__module__}.TinyExtractor"
# tiny, conditional, 3 blocks of 1, 0 and 2 layers, the deep one 48 wide and the only one that
# sees the class, softplus scales, STARFlow's guidance rule in validation.
DEEP_SHALLOW = ["model.num_blocks=3", "model.layers_per_block=[1,0,2]", "model.deep_channels=48",
                "model.cond_deep_only=true", "model.scale=softplus",
                "model.num_classes=${data.num_classes}", "data.num_classes=3",
                "data.dataset_kwargs.num_classes=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("ds")
    base = [o for o in TINY if not o.startswith(("~callbacks", "data.num_classes",
                                                   "sampler.guidance"))]
    sampling = {"num_samples": 6, "grid_size": 4, "probe_size": 8, "reference_size": 8,
                "batch_size": 3}
    cfg = compose_train(tmp, [
        *base, *DEEP_SHALLOW, "callbacks=[model_checkpoint,sampling,ema]", "logger=csv",
        "trainer.max_epochs=1", "trainer.limit_train_batches=3", "sampler=gs_jacobi_auto",
        "sampler.guidance=1.0", "sampler.guidance_rule=starflow",
        *[f"callbacks.sampling.{k}={v}" for k, v in sampling.items()],
        f"+callbacks.sampling.extractor={{_target_:{EXTRACTOR}}}"])
    result = train(cfg)
    return Path(result["last_ckpt"]), result


def test_it_trains_and_validates_with_ranking_plan_and_fid(trained) -> None:
    ckpt, result = trained
    metrics = result["metrics"]
    assert "val/fid_6" in metrics and torch.isfinite(torch.tensor(metrics["val/fid_6"]))
    assert metrics["blocks/crm_share/1"] == 0.0  # the identity block
    assert metrics["blocks/crm_share/2"] > 0 and "sampling/plan_predicted_speedup" in metrics
    net = TarFlow.from_checkpoint(ckpt)
    assert net.config.depths == (1, 0, 2) and net.config.deep_channels == 48
    assert net.config.cond_deep_only and net.config.scale == "softplus"


def test_it_samples_and_evaluates_through_every_cli(trained, tmp_path: Path, capsys) -> None:
    ckpt, _ = trained
    out = sample.run(compose_cfg("sample", tmp_path, [
        f"ckpt_path={ckpt}", "num_samples=4", "batch_size=2", "format=npz",
        "sampler=gs_jacobi_auto", "sampler.guidance=1.0", "sampler.guidance_rule=starflow",
        "probe.dataset=fake", "probe.size=8", "+probe.dataset_kwargs.num_classes=3",
        f"out_dir={tmp_path / 'samples'}"]))
    assert out["num_samples"] == 4 and out["plan"]["blocks"][1]["choice"] == "identity"
    assert "sampling plan at batch 2" in capsys.readouterr().out
    ev = evaluate.run(compose_cfg("eval", tmp_path, [
        f"ckpt_path={ckpt}", "fid.num_samples=4", "fid.batch_size=2", "fid.reference_size=8",
        f"fid.extractor={{_target_:{EXTRACTOR}}}", "sampler=jacobi",
        "sampler.guidance_rule=starflow", "sampler.guidance=1.0",
        f"out_dir={tmp_path / 'eval'}"]))
    assert ev["val/bpd"] > 0 and "val/fid_4" in ev
    rank.main([str(ckpt), "--data", "fake", "--probe", "8"])
    assert "share%" in capsys.readouterr().out
    report = tmp_path / "bench.json"
    bench.main([str(ckpt), "--batch", "2", "--methods", "auto", "jacobi", "--tol", "1e-5",
                "--guidance", "1.0", "--guidance-rule", "starflow", "--repeats", "1",
                "--warmup", "0", "--probe", "8", "--data", "fake", "--plan-cache", "",
                "--json", str(report)])
    rows = {r["method"]: r for r in json.loads(report.read_text())["rows"]}
    assert rows["jacobi"]["iters"]["1"] == 0  # the identity block
    assert rows["auto"]["max_abs_err"] < 1e-2
