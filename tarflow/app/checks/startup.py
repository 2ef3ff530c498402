"""What ``tarflow-train`` checks about the Trainer before it writes any record.

Lightning refuses some settings only when the ``Trainer`` is built (``trainer.max_epochs=-3``,
``accelerator: gpu`` on a machine without one, ``devices`` it cannot use). The real Trainer is
built after the run's records and its W&B run exist (its loggers start W&B), so
:func:`probe_trainer` builds the configured Trainer once beforehand, with its callbacks but
without loggers, and turns its refusal into the usual one line; it also returns what will run,
which :func:`describe_processes` says in one line (processes x data workers vs the cores here).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from tarflow.app.errors import root_cause

log = logging.getLogger(__name__)

# Where Lightning writes its "GPU available: ..." lines (said again by the real Trainer).
_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    saved = {name: logging.getLogger(name).level for name in _LIGHTNING_LOGGERS}
    try:
        for name in saved:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _hint(message: str, cfg: DictConfig) -> str:
    accelerator = str(cfg.trainer.get("accelerator"))
    if not torch.cuda.is_available() and ("gpu" in message.lower() or "cuda" in message.lower()
                                          or accelerator in ("gpu", "cuda")):
        return ("; this machine has no GPU: train on the CPU with trainer=cpu trainer.devices=1 "
                "(add trainer.devices=N for N processes)")
    return ""


def probe_trainer(cfg: DictConfig, callbacks: Callable[[], list[Callback]]) -> L.Trainer:
    """Build ``cfg.trainer`` with the run's callbacks but no loggers (which would start W&B).

    Args:
        cfg: the composed ``train`` config.
        callbacks: makes the run's callbacks (fresh ones: the Trainer adds to its list).

    Raises:
        ValueError: what Lightning refused, in one line, with a hint where one helps.
    """
    with _quiet_lightning():  # the real Trainer says its lines and warnings again
        made = callbacks()  # a bad callback config is refused naming its own key
        try:
            return instantiate(cfg.trainer, callbacks=made, logger=False, _convert_="all")
        except Exception as err:  # whatever the Trainer refuses is a setting of trainer.*
            failure = err
    message = " ".join(str(root_cause(failure)).split())
    raise ValueError(f"trainer: {message}{_hint(message, cfg)}") from None


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def describe_processes(trainer: L.Trainer, num_workers: int) -> tuple[str, bool]:
    """One line on what will run on this node, and whether it oversubscribes the CPU (more
    busy processes than cores, when training on the CPU).

    Returns:
        ``(line, oversubscribed)``.
    """
    processes = int(trainer.num_devices)
    accelerator = type(trainer.accelerator).__name__.replace("Accelerator", "").lower()
    strategy = type(trainer.strategy).__name__.replace("Strategy", "")
    cores = cpu_cores()
    workers = max(0, int(num_workers))
    busy = processes * (1 + workers)
    line = (f"will run {processes} training process(es) on {accelerator} ({strategy}) "
            f"x {workers} data worker(s) each = {busy} busy process(es); {cores} CPU core(s) here")
    on_cpu = accelerator == "cpu"
    if on_cpu and processes == 1:
        line += " (trainer.devices=N: N processes)"
    return line, on_cpu and busy > cores
