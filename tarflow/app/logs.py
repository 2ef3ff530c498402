"""The job log (``<run dir>/<job>.log``, written by Hydra's file handler) holds what a command
printed, not only what it logged.

The commands report their results with ``print`` (a plain line on the console that scripts can
read); Hydra's log file only receives ``logging`` records, so ``sample.log`` and
``evaluate.log`` stayed empty. :func:`job_log` copies every printed line into the log file(s)
while the console output stays exactly as it was, and so every Python warning shown (the data
readers warn about an unreadable image with ``warnings.warn``: ring 1 does not log). Lines that
a progress bar rewrites in place (anything containing a carriage return) are not copied: the log
gets results, not bar frames.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

PRINTED = "tarflow.printed"
WARNED = "tarflow.warnings"  # Python warnings shown during the job (e.g. an unreadable image)


class _Tee:
    """Writes to ``stream`` and sends each completed printed line to ``logger``."""

    def __init__(self, stream: TextIO, logger: logging.Logger) -> None:
        self.stream = stream
        self.logger = logger
        self._pending = ""
        self._rewritten = False  # the pending line was redrawn with "\r" (a progress bar)

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            if not self._rewritten and "\r" not in line and line.strip():
                self.logger.info(line)
            self._rewritten = False
        if "\r" in self._pending:  # keep only the latest frame: bounded memory for long bars
            self._pending = self._pending.rsplit("\r", 1)[1]
            self._rewritten = True
        return written

    def flush(self) -> None:
        self.stream.flush()

    def finish(self) -> None:
        if self._pending.strip() and not self._rewritten:
            self.logger.info(self._pending)
        self._pending = ""

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... of the real stream
        return getattr(self.stream, name)


@contextmanager
def job_log(*file_only: str) -> Iterator[None]:
    """Copy printed lines into the job's log file(s) while the block runs.

    Args:
        file_only: names of loggers whose records go to the log file only, not the console
            (e.g. the per-epoch summary, which would break a progress bar drawn on stdout).

    Outside a Hydra job with a file handler (tests, notebooks) this only keeps secondary
    processes quiet (:func:`first_process_speaks`).
    """
    with first_process_speaks():
        handlers = [h for h in logging.getLogger().handlers
                    if isinstance(h, logging.FileHandler)]
        if not handlers:
            yield
            return
        with _copied_to(handlers, file_only):
            yield


def _below_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


@contextmanager
def first_process_speaks() -> Iterator[None]:
    """In every process of a multi-process launch but the first (DDP ranks, torchrun, srun:
    :func:`tarflow.app.runs.is_secondary_process`), the log handlers pass warnings and errors
    only, so the start-up lines (what will run, the seed, the resume) are said once, by rank 0,
    not once per rank into the same console and log file. Printed lines stay: a command prints
    per-rank lines on purpose (``tarflow-encode``: which shards each rank wrote)."""
    from tarflow.app.runs import is_secondary_process

    if not is_secondary_process():
        yield
        return
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(_below_warning)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(_below_warning)


@contextmanager
def _copied_to(handlers: list[logging.Handler], file_only: tuple[str, ...]) -> Iterator[None]:
    """:func:`job_log`'s work, once its file handlers are known."""
    saved = {}
    for name in (PRINTED, WARNED, *file_only):
        logger = logging.getLogger(name)
        saved[name] = (logger.propagate, logger.level, list(logger.handlers))
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.handlers = [*logger.handlers, *handlers]
    tee = _Tee(sys.stdout, logging.getLogger(PRINTED))
    sys.stdout = tee
    shown = warnings.showwarning

    def show_and_log(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        # Warnings still go to stderr as Python shows them, and into the log file.
        shown(message, category, filename, lineno, file, line)
        logging.getLogger(WARNED).warning("%s: %s", category.__name__, message)

    warnings.showwarning = show_and_log
    try:
        yield
    finally:
        tee.finish()
        if sys.stdout is tee:
            sys.stdout = tee.stream
        if warnings.showwarning is show_and_log:
            warnings.showwarning = shown
        for name, (propagate, level, own) in saved.items():
            logger = logging.getLogger(name)
            logger.propagate, logger.handlers = propagate, own
            logger.setLevel(level)


@contextmanager
def held_file_log() -> Iterator[Callable[[], None]]:
    """Keep the job log file's records in memory until the returned ``release()`` is called.

    The log file (``train.log``) is a record of the run: a command refused by its start-up
    checks must not create one, yet what it logged while starting (the Trainer's device lines,
    the processes that will run) belongs in it once it does start. Until ``release()`` the
    records are held (the console shows them as usual); ``release()`` writes them and lets the
    file handlers write directly again; leaving the block without it drops them.
    """
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    held: dict[logging.Handler, list[logging.LogRecord]] = {h: [] for h in handlers}
    for handler in handlers:
        handler.emit = held[handler].append  # type: ignore[method-assign]

    def release() -> None:
        for handler, records in held.items():
            if "emit" in vars(handler):
                del handler.emit  # back to the class's emit
                for record in records:
                    handler.emit(record)
            records.clear()

    try:
        yield release
    finally:
        for handler in handlers:
            if "emit" in vars(handler):
                del handler.emit
