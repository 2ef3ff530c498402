"""``trainer=fsdp`` on two CPU processes (gloo): sharded checkpoints that resume exactly, that
``TarFlow.from_checkpoint`` and ``tarflow-export`` read, and validation sampling on gathered
parameters. (GPU-only parts, NCCL and bf16 compute, cannot run on this machine.)

FSDP re-executes the command for its second rank, so each run is a ``tarflow-train`` process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tarflow.app.checks.train import check_config
from tarflow.cli.export import main as export_main
from tarflow.cli.train import build, train
from tarflow.lit.fsdp import TarFlowFSDPStrategy
from tarflow.model import TarFlow
from tarflow.model.layers import TransformerLayer
from tests.integration.conftest import EXPERIMENTS, TINY, compose_train
from tests.reliability.helpers import call_main, csv_losses, run_cli, run_clis, train_overrides

# Tiny model on 8x8 fake images, heads 64 wide so the export applies; constant learning rate,
# so a run stopped after one epoch and resumed must match an uninterrupted run step by step.
BASE = [arg for arg in TINY if arg != "trainer=cpu"]
DROP = ("~callbacks.sampling", "final_samples.enabled=false")
FSDP = [arg for arg in BASE if arg not in DROP] + [
    "sampler=jacobi", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
    "trainer.precision=32-true", "~callbacks.ema", "logger=csv", "model.channels=64",
    "model.head_dim=64", "module.optim.warmup_steps=0", "module.optim.lr=1e-3",
    "module.optim.min_lr=1e-3",
    # Validation sampling (no FID) exercises the gathering of full parameters for a round.
    "callbacks.sampling.every_n_epochs=1", "callbacks.sampling.fid_stats_path=null",
    "callbacks.sampling.num_samples=4",
    "callbacks.sampling.batch_size=4", "callbacks.sampling.grid_size=4",
    "callbacks.sampling.probe_size=8", "callbacks.sampling.compare_sequential=0",
]


def test_fsdp_trains_resumes_exactly_and_its_checkpoints_are_readable(tmp_path: Path,
                                                                       capsys) -> None:
    whole, first = run_clis([
        ("train", train_overrides(tmp_path, *FSDP, "trainer.max_epochs=2", run="whole",
                                  base=())),
        ("train", train_overrides(tmp_path, *FSDP, "trainer.max_epochs=1", run="split",
                                  base=())),
    ], cwd=tmp_path)
    assert whole.code == 0, whole.err[-3000:]
    assert first.code == 0, first.err[-3000:]
    split = tmp_path / "split"
    last = split / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp",
                                                      "__1_0.distcp", "meta.pt"]
    resumed = run_cli("train", f"ckpt_path={last}", f"hydra.run.dir={split}",
                      "trainer.max_epochs=2", cwd=tmp_path)
    assert resumed.code == 0, resumed.err[-3000:]

    # Resume: the second epoch's losses are the uninterrupted run's, bit for bit.
    losses_whole = csv_losses(tmp_path / "whole" / "csv" / "version_0" / "metrics.csv")
    losses_split = csv_losses(split / "csv" / "version_0" / "metrics.csv")
    assert sorted(losses_whole) == [0, 1, 2, 3]
    assert losses_split == losses_whole
    # Validation sampling ran on gathered parameters; saves left no temporary directories.
    metrics = (split / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "sampling/iters_total" in metrics
    assert not [p.name for p in (split / "checkpoints").iterdir() if p.name.startswith(".")]
    assert (split / "samples_final.png").is_file()  # read from the sharded last.ckpt

    # The sharded directory reads as one model: the same tensors as torch's own conversion.
    net = TarFlow.from_checkpoint(last)
    dcp_to_torch_save(last, tmp_path / "consolidated.pt")
    full = torch.load(tmp_path / "consolidated.pt", weights_only=True)["model"]
    state = net.state_dict()
    assert set(state) == {k.removeprefix("net.") for k in full}
    assert all(torch.equal(state[k.removeprefix("net.")], v) for k, v in full.items())
    # ... and exports to the official format (raw weights: no EMA under FSDP).
    result = call_main(export_main, ["tarflow-export", str(last), f"{tmp_path / 'export'}/"],
                       capsys)
    assert result.code == 0, result.err
    exported = TarFlow.from_checkpoint(tmp_path / "export" / "fake_model_2_64_2_2_0.05.pth")
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    assert torch.equal(exported(x).z, net(x).z)


def test_fsdp_refusals_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="callbacks.ema .* cannot run under FSDP"):
        train(compose_train(tmp_path, [*BASE, "trainer=fsdp", "trainer.accelerator=cpu"]))
    # A sharded checkpoint (a directory) resumes only under FSDP.
    sharded = tmp_path / "last.ckpt"
    sharded.mkdir()
    (sharded / "meta.pt").write_bytes(b"")
    (sharded / ".metadata").write_bytes(b"")
    with pytest.raises(ValueError, match="sharded .* resume it with trainer=fsdp"):
        train(compose_train(tmp_path, [*TINY, f"ckpt_path={sharded}"]))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fsdp_composes_with_every_experiment(tmp_path: Path, experiment: str) -> None:
    """The paper runs' trainer=fsdp as launched on GPUs (here built on the CPU, the networks on
    the meta device): one FSDP unit per transformer layer, sharded checkpoints, bf16 compute
    with fp32 gradient reduction and buffers."""
    cfg = compose_train(tmp_path, [f"experiment={experiment}", "data=fake", "trainer=fsdp",
                                   "~callbacks.ema", "logger=csv", "trainer.accelerator=cpu"])
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.devices == 8
    check_config(cfg)
    with torch.device("meta"):
        trainer = build(cfg)["trainer"]
    strategy = trainer.strategy
    assert isinstance(strategy, TarFlowFSDPStrategy)
    assert set(strategy.kwargs["auto_wrap_policy"]._module_classes) == {TransformerLayer}
    assert strategy._state_dict_type == "sharded"
    mixed = strategy.mixed_precision_config
    assert (mixed.param_dtype, mixed.reduce_dtype, mixed.buffer_dtype) == (
        torch.bfloat16, torch.float32, torch.float32)
