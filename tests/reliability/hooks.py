"""Test-only callbacks and loggers, importable by path so a Hydra override can add them to a
``tarflow-train`` run, in-process or in a subprocess (e.g. ``+callbacks.killer._target_=
tests.reliability.hooks.KillAtStep``; the repo root is on ``sys.path`` when the cwd is)."""

from __future__ import annotations

import os
import signal

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

KILL_ENV = "TARFLOW_TEST_KILL_AT_STEP"


class KillAtStep(L.Callback):
    """SIGKILLs its own process when the batch after optimiser step ``$TARFLOW_TEST_KILL_AT_STEP``
    is about to start: a crash with no cleanup, no flush and no exception handler.

    Read from the environment so that the killed, the resumed and the reference run share one
    config (unset: the callback does nothing).
    """

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = os.environ.get(KILL_ENV)
        if step is not None and trainer.global_step == int(step):
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonBatchAt(L.Callback):
    """Fills the input images of the batch that starts at global step ``step`` with NaN.

    Args:
        step: optimiser steps done before the poisoned batch.
    """

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            batch[0].fill_(float("nan"))  # x (B, C, H, W), in place: the module sees it


class ExplodingLogger(CSVLogger):
    """A CSV logger whose every output call raises, like a logging backend that went away."""

    def _explode(self, what: str) -> None:
        raise ConnectionError(f"logging backend unreachable during {what}")

    def log_metrics(self, metrics, step=None) -> None:
        self._explode("log_metrics")

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self._explode("log_hyperparams")

    def save(self) -> None:
        self._explode("save")

    def finalize(self, status: str) -> None:
        self._explode("finalize")


def finite_state(state: dict[str, torch.Tensor]) -> bool:
    """True when every floating tensor of a state dict is finite."""
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


class SaveNetAtFitStart(L.Callback):
    """Writes the network's weights as training starts (after any ``init_from`` loading), so a
    test can compare them with the file the run was initialised from.

    Args:
        path: destination of ``{name: tensor}``.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            torch.save({k: v.detach().cpu() for k, v in pl_module.net.state_dict().items()},
                       self.path)
