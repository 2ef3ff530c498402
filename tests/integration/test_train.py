"""End-to-end training on the CPU through ``train(cfg)``: smoke run, exact resume, checkpoint
contracts, DDP equivalence, W&B offline behaviour and the non-finite-loss guard."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from tarflow.cli.train import train
from tarflow.lit import EpochShuffleSampler, TarFlowDataModule, TarFlowLitModule, wandb_utils
from tarflow.lit.ema import WarmupEMA
from tarflow.model import TarFlow, preset
from tests.integration.conftest import (
    REPO,
    TINY,
    LossRecorder,
    SaveNetWeights,
    StopAfterEpochs,
    compose_train,
)
from tests.reliability.helpers import csv_losses


def test_fast_dev_run(tmp_path: Path) -> None:
    """One batch each and, as its comment says, no checkpoint (Lightning 2.6 would still write
    last.ckpt) and no FID (minutes of Inception on a CPU); the sampling callback still runs."""
    with_sampling = [o for o in TINY if o != "~callbacks.sampling"]
    cfg = compose_train(tmp_path, [*with_sampling, "debug=fast_dev_run", "logger=csv"])
    result = train(cfg)
    assert math.isfinite(result["metrics"]["train/loss"])
    assert math.isfinite(result["metrics"]["val/bpd"])
    assert result["last_ckpt"] is None and not list((tmp_path / "run").rglob("*.ckpt"))
    assert "sampling/seconds" in result["metrics"]
    assert not [key for key in result["metrics"] if key.startswith("val/fid")]


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three runs of 2 epochs x 4 steps (EMA on, warm-up + cosine over all 8 steps):
    ``full`` uninterrupted; ``first`` interrupted after epoch 1 (same config, so the same LR
    schedule); ``resumed`` from first's last.ckpt, in first's run dir, with the W&B logger."""
    tmp = tmp_path_factory.mktemp("resume")
    common = [
        *TINY,
        "trainer.max_epochs=2",
        "module.optim.warmup_steps=3",
        "module.optim.lr=1e-3",
        "callbacks.ema.decay=0.9",
        "callbacks.model_checkpoint.monitor=null",
    ]
    runs: dict = {"tmp": tmp}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_DIR", str(tmp / "wandb_home"))
        ckpt = tmp / "first/checkpoints/last.ckpt"
        grid = ["final_samples.enabled=true", "final_samples.per_class=2"]
        for name, extra, cbs in (
            ("full", ["logger=csv", *grid], []),
            ("first", ["logger=many", *grid], [StopAfterEpochs(1)]),
            ("resumed", ["logger=many", f"ckpt_path={ckpt}"], []),
        ):
            recorder = LossRecorder()
            cfg = compose_train(tmp, [*common, *extra], run="first" if name == "resumed" else name)
            result = train(cfg, callbacks=[*cbs, recorder])
            runs[name] = dict(result, losses=recorder.losses, module_sd=_net_state(result))
    return runs


def _net_state(result: dict) -> dict[str, torch.Tensor]:
    module = result["trainer"].lightning_module
    return {k: v.detach().clone() for k, v in module.net.state_dict().items()}


def test_resume_continues_exactly(resume_runs: dict) -> None:
    full, first, resumed = resume_runs["full"], resume_runs["first"], resume_runs["resumed"]
    assert sorted(first["losses"]) == [1, 2, 3, 4]
    assert sorted(resumed["losses"]) == [5, 6, 7, 8]
    for step in range(1, 5):
        assert first["losses"][step] == full["losses"][step]
    # The first step after the resume (and every later one) matches bit for bit on CPU.
    for step in range(5, 9):
        assert resumed["losses"][step] == full["losses"][step], step
    ck_full = torch.load(full["last_ckpt"], weights_only=True)
    ck_res = torch.load(resumed["last_ckpt"], weights_only=True)
    assert ck_full["global_step"] == ck_res["global_step"] == 8
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights
        for name, value in ck_full[key].items():
            assert torch.equal(value, ck_res[key][name]), (key, name)


def test_checkpoint_holds_ema_weights(resume_runs: dict) -> None:
    ckpt = torch.load(resume_runs["full"]["last_ckpt"], weights_only=True)
    assert ckpt["tarflow"]["weights"] == "ema"
    assert ckpt["tarflow"]["config"] == ckpt["hyper_parameters"]["model"]
    # The training data's identity, for tarflow-eval's default data.
    data = ckpt["tarflow"]["data"]
    assert data == ckpt["hyper_parameters"]["data"]
    assert (data["name"], data["img_size"], data["channels"], data["num_classes"]) == (
        "fake", 8, 1, 0)
    # After fit the module holds the EMA weights; the checkpoint's state_dict is that same EMA.
    for name, value in resume_runs["full"]["module_sd"].items():
        assert torch.equal(ckpt["state_dict"][f"net.{name}"], value), name
    raw = ckpt["current_model_state"]
    assert any(not torch.equal(raw[k], ckpt["state_dict"][k]) for k in raw if "proj_out" in k)


def test_final_sample_grid(resume_runs: dict) -> None:
    """10 rows (unconditional: max_classes) x 2 columns of 8x8 images, 2-pixel padding,
    enlarged 8x to be readable; the W&B run got it as media."""
    from PIL import Image

    path = resume_runs["full"]["samples"]
    assert path is not None and Image.open(path).size == ((2 * 10 + 2) * 8, (10 * 10 + 2) * 8)
    wandb_dir = Path(resume_runs["first"]["output_dir"]) / "wandb"
    assert list(wandb_dir.glob("offline-run-*/files/media/images/samples/grid_*.png"))


def test_load_without_hydra(resume_runs: dict) -> None:
    """load_from_checkpoint and TarFlow.from_checkpoint in a fresh process without Hydra."""
    path = resume_runs["full"]["last_ckpt"]
    code = textwrap.dedent(f"""
        import sys, torch
        from tarflow.lit import TarFlowLitModule
        from tarflow.model import TarFlow
        lit = TarFlowLitModule.load_from_checkpoint({str(path)!r}, map_location="cpu")
        net = TarFlow.from_checkpoint({str(path)!r})
        a, b = lit.net.state_dict(), net.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        ema = torch.load({str(path)!r}, weights_only=True)["state_dict"]
        assert all(torch.equal(ema["net." + k], a[k]) for k in a)
        assert "hydra" not in sys.modules, "hydra was imported"
        print("OK", lit.net.config.tag)
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK P2-Ch32-T2-K2" in out.stdout


def test_wandb_offline_run_id_stable(resume_runs: dict) -> None:
    run_dir = Path(resume_runs["first"]["output_dir"])
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # the first run and its resumption
    run_id = wandb_utils.run_id_for(run_dir)
    assert all(r.name.endswith(run_id) or r.name.endswith(f"{run_id}-1") for r in runs)
    ckpt = torch.load(resume_runs["resumed"]["last_ckpt"], weights_only=True)
    assert ckpt["tarflow"]["run_id"] == run_id
    # One CSV folder across the resume: the resumed launch appended to the first one's file
    # (steps 0-3, then 4-7), and each launch's hyper-parameters were kept.
    files = list((run_dir / "csv").glob("version_*/metrics.csv"))
    assert [f.parent.name for f in files] == ["version_0"], files
    assert sorted(csv_losses(files[0])) == list(range(8))
    assert sorted(p.name for p in files[0].parent.glob("hparams*.yaml")) == [
        "hparams.yaml",
        "hparams_1.yaml",
    ]


def test_wandb_failure_falls_back_to_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("service crashed")

    monkeypatch.setattr("lightning.pytorch.loggers.WandbLogger", broken)
    with pytest.warns(UserWarning, match="falling back to CSV"):
        logger = wandb_utils.wandb_logger(save_dir=str(tmp_path))
    assert isinstance(logger, CSVLogger)


def test_offline_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setattr(wandb_utils, "_WARNED_OFFLINE", False)
    with pytest.warns(UserWarning, match="no API key"):
        assert wandb_utils.resolve_offline("auto") is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert wandb_utils.resolve_offline("auto") is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_utils.resolve_offline("auto") is False
    assert wandb_utils.resolve_offline(True) is True


def test_nonfinite_loss_raises(tmp_path: Path) -> None:
    module = TarFlowLitModule(model=preset("tiny").to_dict(), optim={"warmup_steps": 0})
    module.net.nll = lambda x, y=None: torch.full((x.shape[0],), float("nan"))
    dm = TarFlowDataModule(
        "fake",
        img_size=8,
        channels=1,
        batch_size=4,
        train_kwargs={"length": 8},
        val_kwargs={"length": 4},
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    with pytest.raises(FloatingPointError, match=r"global step 0 .*batch index 0"):
        trainer.fit(module, datamodule=dm)


# ----------------------------------------------------------------------------- DDP
def test_sampler_shards_partition_the_global_order() -> None:
    """Rank shards interleave the single-process order; the order depends on (seed, epoch)."""
    one = EpochShuffleSampler(10, seed=1)
    one.set_epoch(3)
    shards = [EpochShuffleSampler(10, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    for s in shards:
        s.set_epoch(3)
    order, (a, b) = list(one), (list(shards[0]), list(shards[1]))
    assert a == order[0::2] and b == order[1::2]
    one.set_epoch(4)
    assert list(one) != order and sorted(one) == list(range(10))


def test_warmup_ema_matches_formula() -> None:
    avg, cur = [torch.zeros(3)], [torch.ones(3)]
    fn = WarmupEMA(0.999, warmup=10)
    fn(avg, cur, torch.tensor(5))  # 6th update: decay (1 + 5) / (10 + 5) = 0.4
    assert torch.allclose(avg[0], torch.full((3,), 0.6))
    assert fn.effective_decay(10**6) == 0.999 and WarmupEMA(0.9, 0).effective_decay(0) == 0.9


def run_one_step(out: str, devices: int, batch_size: int, *, speed_terms: dict | None = None,
                 proj_out_std: float = 0.0) -> None:
    """One optimiser step of the tiny model on 16 fake images (no noise, no label drop), with
    ``module.speed_terms`` and a random (non-identity) ``proj_out`` in every block when given."""
    L.seed_everything(0)
    module = TarFlowLitModule(
        model=preset("tiny").to_dict(),
        noise={"std": 0.0},
        optim={"lr": 1e-3, "warmup_steps": 0},
        label_drop=0.0,
        speed_terms=speed_terms,
    )
    for block in module.net.blocks if proj_out_std else ():  # seeded above: same on every rank
        torch.nn.init.normal_(block.proj_out.weight, std=proj_out_std)
    dm = TarFlowDataModule(
        "fake",
        img_size=8,
        channels=1,
        batch_size=batch_size,
        seed=3,
        train_kwargs={"length": 16},
        val_kwargs={"length": 4},
    )
    strategy = "ddp_spawn" if devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveNetWeights(out)],
    )
    trainer.fit(module, datamodule=dm)


def test_ddp_two_processes_match_one(tmp_path: Path) -> None:
    """2 gloo processes x batch 4 take the same step as 1 process x batch 8."""
    single, double = tmp_path / "single.pt", tmp_path / "ddp.pt"
    run_one_step(str(single), devices=1, batch_size=8)
    code = (
        f"from tests.integration.test_train import run_one_step; "
        f"run_one_step({str(double)!r}, devices=2, batch_size=4)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = torch.load(single, weights_only=True), torch.load(double, weights_only=True)
    torch.manual_seed(0)  # the initial weights of run_one_step (seed_everything(0) first)
    init = TarFlow(preset("tiny")).state_dict()
    moved = [k for k in a if not torch.equal(a[k], init[k])]
    assert moved, "the step changed nothing"
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
