"""``tarflow-train experiment=demo_distill``: pairs, a student trained, saved and resumed (tiny,
on the CPU, without Inception)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tarflow.cli.train import train
from tarflow.model import TarFlow, preset
from tarflow.model.loading import load_for_sampling
from tarflow.model.student import Student
from tests.integration.conftest import compose_train


def _teacher(path: Path) -> Path:
    torch.manual_seed(0)
    net = TarFlow(preset("tiny", num_classes=0, img_size=8, in_channels=1))
    for block in net.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=0.02)
    return net.save_checkpoint(path)


def _overrides(teacher: Path, pairs: Path, epochs: int) -> list[str]:
    return [
        "experiment=demo_distill", f"distill.teacher={teacher}", f"distill.pairs.dir={pairs}",
        "distill.pairs.count=16", "distill.pairs.val_count=8", "distill.pairs.shard_size=8",
        "distill.pairs.batch_size=8", "distill.pairs.sampler.guidance=0.0",
        "data=fake", "data.img_size=8", "data.channels=1", "data.num_classes=0",
        "data.batch_size=8",
        "module.student={channels: 32, layers: 1, head_dim: 16, steps: 1}",
        "module.val_steps=[1,2]", "module.optim.warmup_steps=1",
        "~callbacks.sampling", "~callbacks.progress_bar", "logger=csv",
        f"trainer.max_epochs={epochs}", "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=1",
    ]


@pytest.mark.slow
def test_distill_run_saves_resumes_and_samples(tmp_path: Path) -> None:
    teacher = _teacher(tmp_path / "teacher.pt")
    pairs = tmp_path / "pairs"
    first = train(compose_train(tmp_path, _overrides(teacher, pairs, 1)))
    ckpt = Path(first["last_ckpt"])
    assert first["trainer"].global_step == 2 and "val/rel_err_k2" in first["metrics"]
    assert sorted(p.name for p in pairs.glob("shard_*.pt")) == [f"shard_00000{k}.pt"
                                                                for k in range(3)]
    loaded = load_for_sampling(ckpt, device="cpu")
    assert isinstance(loaded.net, Student) and loaded.summary.kind == "student"
    # Resume for a second epoch: the counters and the run continue from the checkpoint.
    cfg = compose_train(tmp_path, [*_overrides(teacher, pairs, 2), f"ckpt_path={ckpt}"])
    second = train(cfg)
    assert second["trainer"].global_step == 4
    resumed = load_for_sampling(second["last_ckpt"], device="cpu").net
    assert any(not torch.equal(a, b) for a, b in zip(loaded.net.state_dict().values(),
                                                     resumed.state_dict().values(),
                                                     strict=True))
    # Another teacher is refused, in one line, before anything is drawn.
    other = TarFlow(preset("tiny", num_classes=0, img_size=8, in_channels=1))
    other.blocks[0].proj_out.bias.data.fill_(0.1)
    with pytest.raises(ValueError, match="another teacher"):
        train(compose_train(tmp_path, _overrides(other.save_checkpoint(tmp_path / "o.pt"),
                                                 pairs, 1), run="run2"))


@pytest.mark.parametrize("experiment", ["demo_distill", "img64_distill"])
def test_distill_experiments_compose_and_require_a_teacher(tmp_path: Path,
                                                           experiment: str) -> None:
    """Both distillation experiments compose with a teacher; the student is what trains and
    samples (its K steps, no schedule), and the teacher is required before any work."""
    from tarflow.app.checks.train import _check_no_missing_values

    teacher = tmp_path / "teacher.ckpt"
    cfg = compose_train(tmp_path, [f"experiment={experiment}", f"distill.teacher={teacher}"])
    assert cfg.module._target_ == "tarflow.lit.distill.DistillLitModule"
    assert cfg.data._target_ == "tarflow.lit.distill.DistillDataModule"
    assert cfg.module.teacher == cfg.data.teacher == str(teacher)
    assert cfg.sampler.name == "student" and cfg.sampler.steps == 1
    assert cfg.module.pairs_sampler == cfg.distill.pairs.sampler
    assert cfg.distill.pairs.sampler.tol <= 1e-3  # pairs from an accurate teacher sampler
    missing = compose_train(tmp_path, [f"experiment={experiment}"], run="none")
    with pytest.raises(ValueError, match="mandatory value.*distill.teacher"):
        _check_no_missing_values(missing)
