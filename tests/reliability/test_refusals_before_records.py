"""Issue 22 items 1-3: every start-up refusal of ``tarflow-train`` is one line before any record.

- wrong-type overrides name the key, the value and the type (item 1);
- what Lightning refuses while the Trainer is built (``max_epochs=-3``, a GPU on a machine
  without one) is refused before ``.hydra/``, ``train.log`` or a W&B run exist, and a refused
  command removes the run directory it created while leaving any that existed (item 2);
- ``trainer=cpu`` under an 8-GPU experiment is one process, and the start-up says what will run
  (item 3).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tarflow.cli import train
from tests.integration.conftest import compose_train
from tests.reliability.helpers import (
    QUIET_HYDRA,
    assert_one_line_error,
    call_main,
    run_cli,
    train_overrides,
)

pytestmark = pytest.mark.usefixtures("clean_hydra")


def run_train(tmp_path: Path, capsys, *extra: str, run: str = "run"):
    argv = ["tarflow-train", *train_overrides(tmp_path, *extra, run=run), *QUIET_HYDRA]
    return call_main(train.main, argv, capsys)


# ----------------------------------------------------------------------------- item 1
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epochs=abc", "trainer.max_epochs must be an integer, got 'abc'"),
        ("module.optim.lr=abc", "module.optim.lr must be a number, got 'abc'"),
        ("data.batch_size=abc", "data.batch_size must be an integer, got 'abc'"),
        ("data.batch_size=1.5", "data.batch_size must be an integer, got 1.5"),
        ("model.channels=wide", "model.channels must be an integer, got 'wide'"),
        ("sampler.tol=tight", "sampler.tol must be a number, got 'tight'"),
        ("trainer.limit_train_batches=all", "trainer.limit_train_batches must be a number"),
        ("trainer.devices=many", "trainer.devices must be an integer, a list of device ids or "
                                 "'auto', got 'many'"),
        ("callbacks.ema.decay=high", "callbacks.ema.decay must be a number, got 'high'"),
        ("seed=abc", "seed must be an integer, got 'abc'"),
    ],
)
def test_a_wrong_type_is_one_line_before_any_record(tmp_path, capsys, override, message) -> None:
    result = run_train(tmp_path, capsys, override)
    assert_one_line_error(result, message)
    assert not (tmp_path / "run").exists()  # created by Hydra for the job, removed on refusal


def test_values_of_the_right_type_pass_the_type_check(tmp_path, capsys) -> None:
    """Ints where floats are expected, null, 'auto' and a device list are all fine: the run
    gets past the type check (to the model check, which fails on purpose: no run needed)."""
    result = run_train(tmp_path, capsys, "module.optim.lr=1", "trainer.max_epochs=null",
                       "trainer.devices=auto", "data.val_batch_size=4", "trainer.max_epochs=2",
                       "data.img_size=9")
    assert_one_line_error(result, "img_size=9 is not divisible by patch_size=2")


# ----------------------------------------------------------------------------- item 2
def test_a_trainer_refusal_comes_before_any_record(tmp_path, capsys) -> None:
    result = run_train(tmp_path, capsys, "trainer.max_epochs=-3")
    assert_one_line_error(result, "max_epochs", "-3")
    assert not (tmp_path / "run").exists()
    # An existing directory (and what it holds) is never removed, only left as it was.
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    (tmp_path / "empty").mkdir()
    for run in ("kept", "empty"):
        result = run_train(tmp_path, capsys, "trainer.max_epochs=-3", run=run)
        assert_one_line_error(result, "max_epochs")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["notes.txt"]
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_experiment_without_a_gpu_is_refused_with_the_cpu_hint(tmp_path: Path) -> None:
    """The README's paper command on this machine, through the console script with its real
    logging: one line naming the fix, and no outputs/<task>/<time>/ folder, log or W&B run."""
    result = run_cli("train", "experiment=img64_cond", "data=fake", "model=tiny",
                     "~callbacks.sampling", f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert_one_line_error(result, "No supported gpu backend found",
                          "trainer=cpu trainer.devices=1")
    assert not (tmp_path / "outputs").exists(), sorted(map(str, tmp_path.rglob("*")))
    assert not list(tmp_path.rglob("*.log")) and not list(tmp_path.rglob("wandb"))


# ----------------------------------------------------------------------------- item 3
def test_trainer_cpu_under_an_8_gpu_experiment_is_one_process(tmp_path: Path) -> None:
    from tarflow.app.checks.startup import describe_processes, probe_trainer

    paper = compose_train(tmp_path, ["experiment=img64_cond"])
    assert paper.trainer.devices == 8 and paper.trainer.strategy == "ddp"
    cfg = compose_train(tmp_path, ["experiment=img64_cond", "trainer=cpu", "data=fake"])
    assert cfg.trainer.devices == 1
    line, oversubscribed = describe_processes(
        probe_trainer(cfg, lambda: []), num_workers=cfg.data.num_workers)
    assert line.startswith("will run 1 training process(es) on cpu")
    assert "trainer.devices=N" in line  # how to ask for more
    # Asking for more says what that means on these cores.
    more = compose_train(tmp_path, ["experiment=img64_cond", "trainer=cpu", "data=fake",
                                    "trainer.devices=8", "data.num_workers=8"])
    line, oversubscribed = describe_processes(probe_trainer(more, lambda: []), num_workers=8)
    assert "8 training process(es) on cpu (DDP) x 8 data worker(s) each = 72" in line
    assert oversubscribed == (72 > len(__import__("os").sched_getaffinity(0)))


def test_the_start_up_line_reaches_train_log(tiny_run: Path) -> None:
    log = (tiny_run / "train.log").read_text()
    assert "will run 1 training process(es) on cpu (SingleDevice) x 0 data worker(s)" in log
    assert log.index("will run") < log.index("epoch 1/1")


def test_the_log_file_is_held_until_the_start_up_checks_pass(tmp_path: Path) -> None:
    """Lines logged before the records are written are held: written to the log file once the
    command starts, dropped (no file at all) when it is refused."""
    import logging

    from tarflow.app.logs import held_file_log  # new in issue 22

    root, path = logging.getLogger(), tmp_path / "train.log"
    handler = logging.FileHandler(path, delay=True)
    root.addHandler(handler)
    level, logger = root.level, logging.getLogger("tarflow.test_held")
    root.setLevel(logging.INFO)
    try:
        with held_file_log():
            logger.info("checking")
        assert not path.exists()  # refused: no log file was created
        with held_file_log() as release:
            logger.info("started")
            assert not path.exists()
            release()
            logger.info("running")
        logger.info("after")
        handler.flush()
        assert path.read_text().splitlines() == ["started", "running", "after"]
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(level)
