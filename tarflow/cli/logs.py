"""The job log (``<run dir>/<job>.log``, written by Hydra's file handler) holds what a command
printed, not only what it logged.

The commands report their results with ``print`` (a plain line on the console that scripts can
read); Hydra's log file only receives ``logging`` records, so ``sample.log`` and
``evaluate.log`` stayed empty. :func:`job_log` copies every printed line into the log file(s)
while the console output stays exactly as it was. Lines that a progress bar rewrites in place
(anything containing a carriage return) are not copied: the log gets results, not bar frames.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

PRINTED = "tarflow.printed"


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

    Outside a Hydra job with a file handler (tests, notebooks) this does nothing.
    """
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if not handlers:
        yield
        return
    saved = {}
    for name in (PRINTED, *file_only):
        logger = logging.getLogger(name)
        saved[name] = (logger.propagate, logger.level, list(logger.handlers))
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.handlers = [*logger.handlers, *handlers]
    tee = _Tee(sys.stdout, logging.getLogger(PRINTED))
    sys.stdout = tee
    try:
        yield
    finally:
        tee.finish()
        if sys.stdout is tee:
            sys.stdout = tee.stream
        for name, (propagate, level, own) in saved.items():
            logger = logging.getLogger(name)
            logger.propagate, logger.handlers = propagate, own
            logger.setLevel(level)
