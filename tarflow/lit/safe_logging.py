"""Loggers that cannot end a training run: a failing logging call warns once and is skipped.

A W&B service that crashes, a full disk under ``csv/`` or a dropped connection raises inside
``log_metrics`` (or ``log_image``, ``save``, ``finalize``, ...) in the middle of ``fit``. Lightning
does not catch those, so days of training would stop because a chart could not be drawn.
:func:`guard_logger` wraps every such method of one logger: an exception is caught, reported
with one :class:`LoggingFailureWarning` per logger and method (later failures of the same call
are only counted, see :func:`logging_failures`), and training goes on. Other loggers of the run
keep logging normally.

The methods are replaced on the instance rather than by wrapping the logger in another object:
Lightning and our callbacks dispatch on the logger's type (``isinstance(logger, WandbLogger)``
for media, ``CSVLogger`` for ``trainer.log_dir``), and a wrapper would hide it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

from lightning.pytorch.loggers import Logger

# Everything Lightning or our code calls to push data out of the process. Methods a logger class
# does not have (log_image on a CSVLogger) are left alone.
GUARDED_METHODS = (
    "log_metrics",
    "log_hyperparams",
    "log_graph",
    "log_image",
    "log_table",
    "log_text",
    "log_audio",
    "log_video",
    "save",
    "finalize",
    "after_save_checkpoint",
)
# Per-instance failure counts live in the logger's __dict__, so they travel with it when a
# ddp_spawn launch pickles the trainer's loggers into the worker processes.
_COUNTS = "_tarflow_logging_failures"


class LoggingFailureWarning(UserWarning):
    """A logger call failed and was skipped; training continues."""


class _SafeCall:
    """Stands in for one logger method on the instance.

    A class, not a closure: ddp_spawn pickles loggers, and closures do not pickle. It calls the
    method found on the logger's class (or the instance attribute it replaced), so unpickling
    never recurses into itself.
    """

    def __init__(self, logger: Logger, name: str, replaced: Callable | None = None) -> None:
        self.logger = logger
        self.name = name
        self.replaced = replaced

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            if self.replaced is not None:
                return self.replaced(*args, **kwargs)
            return getattr(type(self.logger), self.name)(self.logger, *args, **kwargs)
        except Exception as err:  # any failure: logging must not stop training
            counts = self.logger.__dict__.setdefault(_COUNTS, {})
            counts[self.name] = counts.get(self.name, 0) + 1
            if counts[self.name] == 1:
                warnings.warn(
                    f"logger {type(self.logger).__name__}.{self.name} failed "
                    f"({type(err).__name__}: {err}); training continues without it, and "
                    f"further failures of this call are counted but not reported",
                    LoggingFailureWarning,
                    stacklevel=2,
                )
            return None


def guard_logger(logger: Logger) -> Logger:
    """Make ``logger``'s output methods fail softly (in place); returns the same object.

    Calling it twice is harmless: a method already guarded is not wrapped again.
    """
    for name in GUARDED_METHODS:
        if not callable(getattr(type(logger), name, None)):
            continue
        current = logger.__dict__.get(name)
        if isinstance(current, _SafeCall):
            continue
        setattr(logger, name, _SafeCall(logger, name, current))
    return logger


def guard_loggers(loggers: Iterable[Logger]) -> list[Logger]:
    """:func:`guard_logger` applied to every logger of a run."""
    return [guard_logger(logger) for logger in loggers]


def logging_failures(logger: Logger) -> dict[str, int]:
    """How many times each guarded method of ``logger`` has failed so far (in this process)."""
    return dict(logger.__dict__.get(_COUNTS, {}))
