"""A run killed mid-epoch resumes into exactly the uninterrupted run, and checkpoint writes are
atomic (issue 7, item 1).

Three ``tarflow-train`` subprocesses share one config (3 epochs x 4 steps of the tiny model,
warm-up + cosine LR, EMA, ``logger=many`` with W&B offline): a reference run; a run SIGKILLed at
the start of the batch after global step 6, i.e. two steps past its epoch-0 checkpoint; and its
resumption from ``last.ckpt`` in the same run dir. All use one torch thread, so CPU results are
reproducible bit for bit: data order and augmentation noise are pure functions of
(seed, epoch, batch), and the checkpoint restores weights, EMA, optimiser, LR schedule and
counters, so the replayed steps must give the identical float32 losses, compared as the exact
text the CSV logger wrote.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tarflow.cli.train import build, train
from tarflow.lit import checkpoint_io
from tarflow.lit.checkpoint_io import AtomicCheckpointIO
from tarflow.lit.wandb_utils import finish_wandb, run_id_for
from tarflow.model import TarFlow
from tests.integration.conftest import compose_train
from tests.reliability.helpers import (
    REPO,
    TINY,
    csv_loss_rows,
    csv_losses,
    finish,
    subprocess_env,
    train_overrides,
    train_process,
)
from tests.reliability.hooks import KILL_ENV

KILL_AT = 6  # 4 steps per epoch: the last checkpoint before the crash is the one of step 4
COMMON = (
    "trainer.max_epochs=3",
    "module.optim.warmup_steps=3",
    "module.optim.lr=1e-3",
    "callbacks.ema.decay=0.9",
    "+callbacks.killer._target_=tests.reliability.hooks.KillAtStep",
)


def _step(path: Path) -> int:
    return int(torch.load(path, weights_only=True)["global_step"])


@pytest.fixture(scope="module")
def crash_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("crash")
    env = subprocess_env(tmp / "wandb_home")
    crashed = tmp / "crashed"
    # The reference and the doomed run are independent single-thread processes: run together.
    reference = train_process(train_overrides(tmp, *COMMON, "logger=csv", run="reference"), env)
    doomed = train_process(
        train_overrides(tmp, *COMMON, "logger=many", run="crashed"), {**env, KILL_ENV: str(KILL_AT)}
    )
    runs: dict = {"tmp": tmp, "crashed": crashed, "killed": finish(doomed)}
    runs["reference"] = finish(reference)
    last = crashed / "checkpoints" / "last.ckpt"
    runs["step_at_crash"] = _step(last) if last.is_file() else None
    runs["net_at_crash"] = TarFlow.from_checkpoint(last) if last.is_file() else None
    resumed = train_process(
        train_overrides(tmp, *COMMON, "logger=many", f"ckpt_path={last}", run="crashed"), env
    )
    runs["resumed"] = finish(resumed)
    return runs


def test_the_crash_happened_mid_epoch_after_a_checkpoint(crash_runs: dict) -> None:
    code, _, err = crash_runs["killed"]
    assert code == -signal.SIGKILL, err[-3000:]
    assert crash_runs["step_at_crash"] == 4  # the end-of-epoch-0 save; steps 5 and 6 are lost
    assert crash_runs["net_at_crash"] is not None
    logged = csv_loss_rows(crash_runs["crashed"] / "csv" / "version_0" / "metrics.csv")
    # Every step up to the crash was logged (the resumed launch's rows follow them).
    assert [step for step, _ in logged[:KILL_AT]] == list(range(KILL_AT))


def test_resumed_losses_equal_the_uninterrupted_run_bit_for_bit(crash_runs: dict) -> None:
    for name in ("reference", "resumed"):
        code, _, err = crash_runs[name]
        assert code == 0, f"{name} run failed:\n{err[-3000:]}"
    tmp, crashed = crash_runs["tmp"], crash_runs["crashed"]
    reference = csv_losses(tmp / "reference" / "csv" / "version_0" / "metrics.csv")
    # One CSV file across the resume: the killed launch's rows (steps 0-5), then the resumed
    # launch's from its checkpoint on (4-11): the two lost steps appear twice.
    rows = csv_loss_rows(crashed / "csv" / "version_0" / "metrics.csv")
    assert not (crashed / "csv" / "version_1").exists()
    assert [step for step, _ in rows] == [*range(KILL_AT), *range(4, 12)]
    assert sorted(reference) == list(range(12))
    for step, loss in rows:
        assert loss == reference[step], (step, loss, reference[step])
    # The end states agree exactly too: EMA and raw weights, and the optimiser moments.
    ref = torch.load(tmp / "reference" / "checkpoints" / "last.ckpt", weights_only=True)
    res = torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=True)
    assert ref["global_step"] == res["global_step"] == 12
    for key in ("state_dict", "current_model_state"):
        for name, value in ref[key].items():
            assert torch.equal(value, res[key][name]), (key, name)
    for a, b in zip(
        ref["optimizer_states"][0]["state"].values(),
        res["optimizer_states"][0]["state"].values(),
        strict=True,
    ):
        assert all(torch.equal(a[k], b[k]) for k in a), "optimiser state differs"


def test_wandb_offline_run_continues_under_the_same_id(crash_runs: dict) -> None:
    crashed = crash_runs["crashed"]
    run_id = run_id_for(crashed)
    runs = sorted((crashed / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # the killed launch and its resumption
    assert all(r.name.split("-", 3)[-1].startswith(run_id) for r in runs), (run_id, runs)
    assert all(list(r.glob(f"run-{run_id}*.wandb")) for r in runs)
    ckpt = torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["tarflow"]["run_id"] == run_id


# ----------------------------------------------------------------------------- atomic saves
def test_failed_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """The second save of ``last.ckpt`` writes half of a chunk and then fails (a full disk):
    the first one still loads, both as a plain state dict and as a TarFlow."""
    real = checkpoint_io._write
    seen: list[str] = []

    def fail_second_last(fd: int, data) -> int:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if Path(name).name.startswith(".last.ckpt.") and name not in seen:
            seen.append(name)
        if len(seen) == 2 and name == seen[1]:
            real(fd, memoryview(data).cast("B")[: max(1, len(data) // 2)])
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real(fd, data)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell the checkpoint's descriptor from others")
    monkeypatch.setattr(checkpoint_io, "_write", fail_second_last)
    cfg = compose_train(tmp_path, [*TINY, "trainer.max_epochs=2", "logger=csv"])
    with pytest.raises(OSError, match="No space left"):
        train(cfg)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4  # the epoch-0 save, untouched by the failed epoch-1 save
    TarFlow.from_checkpoint(last)
    assert not list(last.parent.glob(".*.tmp")), "the half-written scratch file was left behind"


def test_training_saves_through_the_atomic_plugin(tmp_path: Path) -> None:
    parts = build(compose_train(tmp_path, [*TINY, "logger=csv"]))
    try:
        assert isinstance(parts["trainer"].strategy.checkpoint_io, AtomicCheckpointIO)
    finally:
        finish_wandb(parts["loggers"])


def _other_filesystem(path: Path) -> Path | None:
    """A writable directory on another filesystem than ``path`` (tmpfs at /dev/shm), or None."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        return None
    return shm if os.stat(shm).st_dev != os.stat(path).st_dev else None


@pytest.mark.parametrize("io", ["atomic", "lightning"])
def test_sigkill_during_a_save(tmp_path: Path, io: str) -> None:
    """A process killed half-way through saving: our plugin leaves the previous file, while
    Lightning's default (the control, showing the harness catches a non-atomic save) leaves a
    truncated one when ``$TMPDIR`` is on another filesystem, as on most clusters."""
    other = _other_filesystem(tmp_path)
    if io == "lightning" and other is None:
        pytest.skip("needs $TMPDIR on another filesystem than the checkpoint (e.g. /dev/shm)")
    with tempfile.TemporaryDirectory(dir=other) as scratch:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.reliability.save_crash", io, str(tmp_path)],
            cwd=REPO,
            env=subprocess_env(TMPDIR=scratch),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    last = tmp_path / "last.ckpt"
    if io == "atomic":
        ckpt = torch.load(last, weights_only=True)
        assert ckpt["global_step"] == 1 and bool((ckpt["state_dict"]["w"] == 1.0).all())
    else:
        with pytest.raises(RuntimeError, match="zip archive"):
            torch.load(last, weights_only=True)
