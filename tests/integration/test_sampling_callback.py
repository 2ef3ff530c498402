"""The validation sampling callback inside real (tiny, CPU) Lightning runs.

FID here uses a small seeded conv extractor (a random Inception collapses every input to the same
features); the real-Inception path is exercised by a slow test and by tarflow-eval's tests.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import nn

from tarflow.lit.callbacks.sampling import SamplingCallback
from tarflow.lit.datamodule import TarFlowDataModule
from tarflow.lit.module import TarFlowLitModule
from tarflow.sampling.schedule import SEQUENTIAL

REPO = Path(__file__).resolve().parents[2]
NUM_CLASSES = 3
TINY_MODEL = dict(img_size=8, in_channels=1, patch_size=2, channels=32, num_blocks=2,
                  layers_per_block=1, num_classes=NUM_CLASSES, head_dim=16, noise_std=0.05)
SAMPLER = {"name": "gs_jacobi_auto", "schedule": "auto", "tol": 1e-5, "guidance": 0.5,
           "auto": {"tough_factor": 1.0, "tough_segments": 4}}


class TinyExtractor(nn.Module):
    """A seeded He-initialised conv layer, pooled to 32 features; accepts 1 or 3 channels."""

    name = "tiny-conv"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(16, 3, 3, 3, generator=gen) * math.sqrt(2 / 27))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(images.float().expand(-1, 3, -1, -1)))  # (B, 16, H, W)
        return torch.cat([h.mean((2, 3)), h.std((2, 3))], dim=1)  # (B, 32)


def tiny_module(seed: int = 0) -> TarFlowLitModule:
    """The real LightningModule with a small net whose output layers are not zero (a fresh
    TarFlow is the identity, which would make every sampler trivially exact)."""
    torch.manual_seed(seed)
    module = TarFlowLitModule(TINY_MODEL, optim={"lr": 1e-3, "warmup_steps": 0})
    for block in module.net.blocks:
        nn.init.normal_(block.proj_out.weight, std=0.05)
    return module


def tiny_data() -> TarFlowDataModule:
    return TarFlowDataModule("fake", img_size=8, channels=1, num_classes=NUM_CLASSES,
                             batch_size=8, persistent_workers=False,
                             dataset_kwargs={"num_classes": NUM_CLASSES},
                             train_kwargs={"length": 32}, val_kwargs={"length": 16})


def tiny_callback(tmp_path: Path, cls: type = SamplingCallback, **overrides) -> SamplingCallback:
    kwargs = dict(sampler=SAMPLER, num_samples=12, batch_size=5, grid_size=6, probe_size=16,
                  compare_sequential=3, fid_stats_path=str(tmp_path / "ref.npz"),
                  reference_size=24, fid_batch_size=8, extractor=TinyExtractor())
    return cls(**{**kwargs, **overrides})


def trainer(tmp_path: Path, callbacks: list, **overrides) -> L.Trainer:
    kwargs = dict(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2,
                  logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=str(tmp_path),
                  num_sanity_val_steps=1, log_every_n_steps=1)
    return L.Trainer(callbacks=callbacks, **{**kwargs, **overrides})


METRIC_KEYS = [
    "val/fid_12", "sampling/seconds", "sampling/seconds_per_image", "sampling/iters_total",
    "sampling/speedup_vs_sequential", "sampling/max_err_vs_sequential",
    "sampling/plan_predicted_speedup", "sampling/plan_seconds", "sampling/plan_reused",
    *[f"{k}/{b}" for b in (0, 1) for k in ("sampling/iters", "blocks/crm", "blocks/crm_share",
                                            "blocks/igm_z", "blocks/igm_zeros")],
]


class SequentialDearer(SamplingCallback):
    """Measured costs, with the sequential loop's tripled: the plan runs Jacobi in some block on
    any machine load, so the round has a convergence trace to chart (under a loaded CPU the
    measured plan was all-sequential now and then, and there was no chart)."""

    def _planner_timer(self, trainer):
        return lambda block, cand, seconds: seconds * (3.0 if cand.segments == SEQUENTIAL
                                                       else 1.0)


def test_logs_every_key_to_csv_and_wandb(tmp_path: Path) -> None:
    cb = tiny_callback(tmp_path, SequentialDearer)
    csv_logger = CSVLogger(str(tmp_path / "csv"), name="", version="run")
    wandb_logger = WandbLogger(save_dir=str(tmp_path / "wb"), offline=True, project="t")
    trainer(tmp_path, [cb, EMAWeightAveraging(decay=0.5)],
            logger=[csv_logger, wandb_logger]).fit(tiny_module(), tiny_data())
    run = wandb_logger.experiment
    summary = {k: run.summary[k] for k in run.summary.keys()}
    run_dir = Path(run.dir).parent
    run.finish()
    assert cb.validations == 1  # the sanity check does not count

    # CSV: every metric a column with a value; media as files beside metrics.csv.
    rows = list(csv.DictReader(open(tmp_path / "csv" / "run" / "metrics.csv")))
    values = {k: v for row in rows for k, v in row.items() if v not in ("", None)}
    assert set(METRIC_KEYS) <= set(values), set(METRIC_KEYS) - set(values)
    assert 0 <= float(values["val/fid_12"]) < math.inf
    assert float(values["sampling/images"]) == 12
    media = tmp_path / "csv" / "run" / "media"
    for stem in ("samples_grid", "blocks_crm_chart", "sampling_iters_chart",
                 "sampling_convergence"):
        assert len(list(media.glob(f"{stem}_epoch000_*.png"))) == 1, stem
    plan = list(csv.reader(open(next(media.glob("sampling_plan_epoch000_*.csv")))))
    assert plan[0][:4] == ["block", "candidate", "chosen", "median_ms"]
    assert {r[0] for r in plan[1:]} == {"0", "1"} and "seq" in {r[1] for r in plan[1:]}
    assert sum(r[2] == "True" for r in plan[1:]) == 2  # one choice per block
    table = list(csv.reader(open(next(media.glob("blocks_ranking_*.csv")))))
    assert table[0][:5] == ["block", "crm", "crm_share", "igm_z", "igm_zeros"]
    assert table[0][-4:] == ["segments", "max_iters", "init", "iters_used"]
    assert [r[0] for r in table[1:]] == ["0", "1"]
    assert abs(sum(float(r[2]) for r in table[1:]) - 100.0) < 1e-3  # shares in percent

    # W&B (offline): scalars, the table, the charts and the grid in the run.
    wandb_keys = {"blocks/ranking", "samples/grid", "blocks/crm_chart_table",
                  "sampling/iters_chart_table", "sampling/convergence_table", "sampling/plan"}
    assert set(METRIC_KEYS) | wandb_keys <= set(summary), (set(METRIC_KEYS) | wandb_keys) - set(
        summary)
    files = run_dir / "files" / "media"
    assert list((files / "images" / "samples").glob("grid_*.png"))
    ranking = json.loads(next((files / "table" / "blocks").glob("ranking_*.json")).read_text())
    assert ranking["columns"][0] == "block" and len(ranking["data"]) == 2
    assert (tmp_path / "ref.npz").is_file()  # reference statistics cached on first use


class WeightSpy(SamplingCallback):
    """Records the weights the round samples with, and the EMA callback's other copy."""

    def __init__(self, ema: EMAWeightAveraging, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ema, self.seen, self.other = ema, [], []

    def run_round(self, trainer, pl_module, *, fid_due):
        flat = torch.cat([p.detach().flatten() for p in pl_module.net.parameters()])
        other = torch.cat([p.detach().flatten()
                           for p in self.ema._average_model.module.net.parameters()])
        self.seen.append(flat.clone())
        self.other.append(other.clone())
        return super().run_round(trainer, pl_module, fid_due=fid_due)


def test_rounds_sample_with_the_ema_weights(tmp_path: Path) -> None:
    ema = EMAWeightAveraging(decay=0.5)
    spy = tiny_callback(tmp_path, WeightSpy, ema=ema, fid_stats_path=None, compare_sequential=0)
    module = tiny_module()
    trainer(tmp_path, [spy, ema], limit_train_batches=3).fit(module, tiny_data())
    final = torch.cat([p.detach().flatten() for p in module.net.parameters()])
    # After fit the module holds the EMA weights (on_train_end copies them in): the round saw
    # exactly those, while the raw training weights sat in the averaging callback's copy.
    assert torch.equal(spy.seen[-1], final)
    assert not torch.allclose(spy.seen[-1], spy.other[-1])


def test_listed_after_ema_raises(tmp_path: Path) -> None:
    cb = tiny_callback(tmp_path, fid_stats_path=None)
    with pytest.raises(RuntimeError, match="BEFORE the weight-averaging callback"):
        trainer(tmp_path, [EMAWeightAveraging(), cb]).fit(tiny_module(), tiny_data())


def test_round_and_fid_cadence(tmp_path: Path) -> None:
    cb = SamplingCallback(every_n_epochs=2, fid_every_n_epochs=3, fid_on_last_epoch=True,
                          fid_stats_path=str(tmp_path / "ref.npz"))
    plans = [cb.round_due(v, last=v == 7) for v in range(1, 8)]
    # Sampling at every 2nd validation, FID at every 3rd and at the last one (7).
    assert plans == [(False, False), (True, False), (True, True), (True, False), (False, False),
                     (True, True), (True, True)]
    no_fid = SamplingCallback(every_n_epochs=1, fid_stats_path=None)
    assert no_fid.round_due(5, last=True) == (True, False)


def _validate_shards(tmp_path: Path, devices: int) -> tuple[dict, dict]:
    out = tmp_path / f"world{devices}"
    # The paper's rule: a measured plan may differ between the two runs (timing noise), and
    # this test is about sharding; test_sampling_plan checks that ranks share one plan.
    cb = tiny_callback(tmp_path, num_samples=11, batch_size=3, samples_dir=str(out),
                       compare_sequential=0, sampler={**SAMPLER, "schedule": "auto:paper"})
    kwargs = dict(strategy="ddp_spawn") if devices > 1 else {}
    metrics = trainer(tmp_path, [cb], devices=devices, **kwargs).validate(
        tiny_module(), tiny_data(), verbose=False)[0]
    shards = {int(p.stem.split("rank")[1]): dict(np.load(p)) for p in out.glob("*.npz")}
    return shards, metrics


def test_ddp_shards_are_disjoint_and_union_is_the_single_process_set(tmp_path: Path) -> None:
    one, metrics_one = _validate_shards(tmp_path, 1)
    two, metrics_two = _validate_shards(tmp_path, 2)
    assert sorted(one) == [0] and sorted(two) == [0, 1]
    idx0, idx1 = two[0]["indices"].tolist(), two[1]["indices"].tolist()
    assert not set(idx0) & set(idx1)
    assert sorted(idx0 + idx1) == one[0]["indices"].tolist() == list(range(11))
    by_index = {int(i): k for k, i in enumerate(one[0]["indices"])}
    for shard in two.values():
        rows = [by_index[int(i)] for i in shard["indices"]]
        np.testing.assert_array_equal(shard["labels"], one[0]["labels"][rows])
        np.testing.assert_allclose(shard["images"], one[0]["images"][rows], atol=1e-5)
    # Feature sums merged over ranks: the same FID as one process computes.
    assert metrics_two["sampling/images"] == metrics_one["sampling/images"] == 11
    assert metrics_two["val/fid_11"] == pytest.approx(metrics_one["val/fid_11"], rel=1e-4)


FAILING_SCRIPT = """
import sys
from pathlib import Path
from tests.integration.test_sampling_callback import FailOnRankOne, tiny_callback, tiny_data
from tests.integration.test_sampling_callback import tiny_module, trainer

if __name__ == "__main__":
    tmp = Path(sys.argv[1])
    cb = tiny_callback(tmp, FailOnRankOne, fid_stats_path=None, compare_sequential=0)
    trainer(tmp, [cb], devices=2, strategy="ddp_spawn").validate(tiny_module(), tiny_data())
"""


class FailOnRankOne(SamplingCallback):
    def _local_round(self, trainer, *args):
        if trainer.global_rank == 1:
            raise ValueError("injected failure on rank one")
        return super()._local_round(trainer, *args)


def test_a_failing_rank_makes_every_rank_raise(tmp_path: Path) -> None:
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(FAILING_SCRIPT))
    # A subprocess with a timeout: without the shared failure flag rank zero would wait forever.
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode != 0
    # Whichever rank the launcher reports first: rank one's own error, or rank zero naming it.
    assert ("injected failure on rank one" in proc.stderr
            or "rank(s) [1] failed while sampling" in proc.stderr), proc.stderr[-2000:]


@pytest.mark.slow
def test_real_inception_fid_on_the_digits(tmp_path: Path) -> None:
    """The demo recipe at a small N with the real Inception weights (about a minute on 2 cores)."""
    from tarflow.eval import default_weights_path

    if not default_weights_path().is_file():
        pytest.skip("no Inception weights installed")
    data = TarFlowDataModule("demo", img_size=8, channels=1, num_classes=10, batch_size=64,
                             persistent_workers=False)
    module = TarFlowLitModule({**TINY_MODEL, "num_classes": 10})
    cb = SamplingCallback(SAMPLER, num_samples=24, batch_size=24, grid_size=16, probe_size=64,
                          fid_stats_path=str(tmp_path / "digits.npz"), reference_size=48)
    trainer(tmp_path, [cb], limit_train_batches=5).fit(module, data)
    fid = float(module.trainer.callback_metrics["val/fid_24"])
    assert math.isfinite(fid) and fid > 0


def test_configured_callback_in_a_hydra_training_run(tmp_path: Path) -> None:
    """conf/callbacks/sampling.yaml, instantiated by tarflow-train's own code path."""
    from tarflow.cli.train import train
    from tests.integration.conftest import TINY, compose_train

    cfg = compose_train(tmp_path, [
        *[o for o in TINY if not o.startswith("~callbacks")], "callbacks=[sampling,ema]",
        "logger=csv", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "sampler=gs_jacobi_auto",
        "callbacks.sampling.num_samples=6", "callbacks.sampling.grid_size=4",
        "callbacks.sampling.probe_size=8", "callbacks.sampling.reference_size=8",
        f"+callbacks.sampling.extractor={{_target_:{TinyExtractor.__module__}.TinyExtractor}}"])
    result = train(cfg)
    assert "val/fid_6" in result["metrics"] and "blocks/crm_share/1" in result["metrics"]
    assert list((tmp_path / "data" / "fid_stats").glob("fake_8px_c1_train8.npz"))
    assert list(Path(result["output_dir"]).rglob("media/samples_grid_*.png"))
    assert (Path(result["output_dir"]) / "sampling_plans.json").is_file()  # the run's plans
    assert list(Path(result["output_dir"]).rglob("media/sampling_plan_*.csv"))
