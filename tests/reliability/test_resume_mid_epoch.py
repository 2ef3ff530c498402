"""A run killed after a *mid-epoch* checkpoint (``trainer.val_check_interval=0.5``, as
``experiment=demo_fast_sampling`` uses) resumes into exactly the uninterrupted run (issue 30,
item 3): the checkpoint holds the data position (epoch and batches consumed), and the resumed
epoch continues with the batches the uninterrupted run saw next, not the epoch's first ones.

As in test_crash_resume.py: one-thread subprocesses of the tiny model on fake data (4 steps an
epoch, 2 epochs), a reference run, a run SIGKILLed at the start of the batch after step 3 (its
last checkpoint is the mid-epoch one of step 2), and its resumption; losses compared as the
exact text the CSV logger wrote.
"""

from __future__ import annotations

import signal

import torch

from tests.reliability.helpers import (
    csv_loss_rows,
    csv_losses,
    finish,
    subprocess_env,
    train_overrides,
    train_process,
)
from tests.reliability.hooks import KILL_ENV

KILL_AT = 3  # checkpoints at steps 2 (mid-epoch 0) and 4: the crash loses step 2's successor
COMMON = (
    "trainer.max_epochs=2",
    "trainer.val_check_interval=0.5",
    "logger=csv",
    "module.optim.warmup_steps=2",
    "module.optim.lr=1e-3",
    "+callbacks.killer._target_=tests.reliability.hooks.KillAtStep",
)


def test_a_run_resumed_from_a_mid_epoch_checkpoint_equals_the_uninterrupted_run(tmp_path):
    env = subprocess_env(tmp_path / "wandb_home")
    crashed = tmp_path / "crashed"
    reference = train_process(train_overrides(tmp_path, *COMMON, run="reference"), env)
    doomed = train_process(train_overrides(tmp_path, *COMMON, run="crashed"),
                           {**env, KILL_ENV: str(KILL_AT)})
    code, _, err = finish(doomed)
    assert code == -signal.SIGKILL, err[-3000:]
    last = crashed / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["epoch"] == 0  # mid-epoch 0
    resumed = train_process(train_overrides(tmp_path, *COMMON, f"ckpt_path={last}",
                                            run="crashed"), env)
    for name, proc in (("reference", reference), ("resumed", resumed)):
        code, _, err = finish(proc)
        assert code == 0, f"{name} run failed:\n{err[-3000:]}"
    ref = csv_losses(tmp_path / "reference" / "csv" / "version_0" / "metrics.csv")
    rows = csv_loss_rows(crashed / "csv" / "version_0" / "metrics.csv")
    # The killed launch logged steps 0-2; the resumed one 2-7 (step 2 replayed).
    assert [step for step, _ in rows] == [*range(KILL_AT), *range(2, 8)]
    assert sorted(ref) == list(range(8))
    for step, loss in rows:
        assert loss == ref[step], (step, loss, ref[step])
    end_ref = torch.load(tmp_path / "reference" / "checkpoints" / "last.ckpt", weights_only=True)
    end_res = torch.load(last, weights_only=True)
    assert end_ref["global_step"] == end_res["global_step"] == 8
    for name, value in end_ref["state_dict"].items():
        assert torch.equal(value, end_res["state_dict"][name]), name
