"""One sample set for every entry point (issue 20): the same checkpoint, sampler and seed give the
same images through ``tarflow-sample`` and the validation callback, and the same FID through
``tarflow-eval`` and ``tarflow-bench --fid``. All of them draw member ``i`` from seed ``seed + i``
(:func:`tarflow.sampling.sample_set.fixed_inputs`) through :func:`tarflow.eval.fid_at_n.draw_set`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tarflow.cli import bench, evaluate, sample
from tarflow.eval import images_to_uint8
from tarflow.lit.callbacks.sampling import SamplingCallback
from tarflow.lit.module import TarFlowLitModule
from tarflow.model import TarFlow
from tests.integration.test_sample_eval_cli import CONFIG, EXTRACTOR, FAKE, compose_cfg
from tests.integration.test_sampling_callback import TinyExtractor, tiny_data, trainer

SEED = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = TarFlow(CONFIG)
    for block in net.blocks:  # a fresh TarFlow is the identity map: every sampler exact
        torch.nn.init.normal_(block.proj_out.weight, std=0.05)
    return net.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


def test_sample_and_the_validation_callback_draw_the_same_images(tmp_path: Path,
                                                                checkpoint: Path) -> None:
    cfg = compose_cfg("sample", tmp_path, [f"ckpt_path={checkpoint}", "num_samples=5",
                                           "batch_size=2", "format=npz", "sampler=jacobi",
                                           "sampler.schedule=jacobi:3", f"seed={SEED}"])
    sample.run(cfg)
    written = np.load(tmp_path / "out" / "samples.npz")

    module = TarFlowLitModule(dataclasses.asdict(CONFIG), optim={"lr": 1e-3, "warmup_steps": 0})
    module.net.load_state_dict(TarFlow.from_checkpoint(checkpoint).state_dict())
    shards = tmp_path / "shards"
    # Another batch size than the command's: the set does not depend on the batching.
    cb = SamplingCallback({"schedule": "jacobi:3"}, num_samples=5, batch_size=3, seed=SEED,
                          grid_size=5, probe_size=0, samples_dir=str(shards))
    trainer(tmp_path, [cb]).validate(module, tiny_data(), verbose=False)
    shard = np.load(next(shards.glob("*.npz")))

    assert shard["indices"].tolist() == written["indices"].tolist() == list(range(5))
    np.testing.assert_array_equal(shard["labels"], written["arr_1"])
    pixels = images_to_uint8(torch.from_numpy(shard["images"]))[:, :1]  # (5, 1, 8, 8)
    gap = np.abs(pixels.permute(0, 2, 3, 1).numpy().astype(int) - written["arr_0"].astype(int))
    assert gap.max() <= 1  # float rounding between batch sizes only


def test_eval_and_bench_give_the_same_fid(tmp_path: Path, checkpoint: Path, monkeypatch) -> None:
    result = evaluate.run(compose_cfg("eval", tmp_path, [
        f"ckpt_path={checkpoint}", *FAKE, "bpd.enabled=false", "fid.num_samples=6",
        "fid.batch_size=4", f"fid.seed={SEED}", "fid.reference_size=16",
        f"fid.extractor={{_target_:{EXTRACTOR}}}", "sampler=sequential"]))
    # The benchmark's Inception replaced by the same small extractor eval was given.
    monkeypatch.setattr(bench, "InceptionFeatures", lambda weights=None: TinyExtractor())
    # bench's start-up check only asks that a weights file exist (a clean CI has none built).
    (tmp_path / "inception.pth").write_bytes(b"stand-in")
    monkeypatch.setenv("TARFLOW_INCEPTION_WEIGHTS", str(tmp_path / "inception.pth"))
    out = tmp_path / "bench.json"
    assert bench.main([str(checkpoint), "--methods", "jacobi", "--batch", "2", "--repeats", "1",
                       "--warmup", "0", "--fid", "6", "--fid-batch", "5",
                       "--fid-stats", result["fid_stats_path"], "--seed", str(SEED),
                       "--device", "cpu", "--plan-cache", "", "--json", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["sequential"]["fid"] == pytest.approx(result["val/fid_6"], rel=1e-4)
    # A different seed is a different set: the comparison above can fail.
    other = tmp_path / "other.json"
    bench.main([str(checkpoint), "--methods", "jacobi", "--batch", "2", "--repeats", "1",
                "--warmup", "0", "--fid", "6", "--fid-batch", "5",
                "--fid-stats", result["fid_stats_path"], "--seed", str(SEED + 1),
                "--device", "cpu", "--plan-cache", "", "--json", str(other)])
    moved = {r["method"]: r for r in json.loads(other.read_text())["rows"]}["sequential"]["fid"]
    assert moved != pytest.approx(result["val/fid_6"], rel=1e-4)
