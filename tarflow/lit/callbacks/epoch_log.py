"""One line per training epoch in the Python log (``train.log`` under ``tarflow-train``).

The metrics otherwise live in W&B, the CSV file and a progress bar that is redrawn in place; a
run's own log should say, without any of those, how each epoch went. Rank zero only.
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch

log = logging.getLogger(__name__)
# The headline numbers; per-block values (blocks/*, sampling/iters/<b>) stay in W&B and CSV.
KEYS = ("train/", "val/", "sampling/seconds_per_image", "sampling/speedup_vs_sequential",
        "sampling/iters_total", "sampling/fallback")


class EpochLog(L.Callback):
    """Logs ``epoch 3/45: 50 steps in 12.3 s; train/loss=0.1234, val/bpd=4.567`` after each
    training epoch (and its validation, which Lightning runs before ``on_train_epoch_end``).

    The values are the trainer's callback metrics at that moment (those starting with one of
    ``KEYS``): epoch aggregates for validation keys, the last step's value for per-step
    training keys.
    """

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._first_step = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._first_step = trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {
            key: float(value)
            for key, value in sorted(trainer.callback_metrics.items())
            if key.startswith(KEYS) and torch.is_tensor(value) and value.numel() == 1
        }
        of = f"/{trainer.max_epochs}" if (trainer.max_epochs or 0) > 0 else ""
        values = ", ".join(f"{key}={value:.4g}" for key, value in metrics.items())
        log.info("epoch %d%s: %d steps in %.1f s; %s", trainer.current_epoch + 1, of,
                 trainer.global_step - self._first_step, time.perf_counter() - self._start,
                 values or "no metrics logged")
