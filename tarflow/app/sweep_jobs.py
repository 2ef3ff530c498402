"""One job of a ``--multirun`` sweep: a failure is a row of the sweep's summary, not its end.

Hydra ends a sweep at the first job that raises (the basic launcher after its batch, the submitit
launchers at once) and then never calls the callbacks that write ``summary.md``; a NaN loss
printed a traceback, and the failed job's folder stayed empty with nothing saying why.
:func:`run_job` wraps a command's job body: in a sweep, an exception (a start-up refusal, a
non-finite loss, a sampler value that cannot work) is written to ``<job dir>/failed.json``
(the one-line reason, the job's overrides and, for errors that are not the user's, the
traceback), said in one ``error: job N: ...`` line on stderr, and the job returns ``None``, so
the sweep goes on; :class:`~tarflow.app.sweep_summary.SweepSummary` then lists the job as
``failed: <reason>`` and the command exits with status 1. Outside a sweep nothing changes.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tarflow.app.errors import USER_ERRORS, describe, in_multirun, root_cause
from tarflow.app.runs import is_secondary_process
from tarflow.app.sweep_summary import FAILED
from tarflow.files import atomic_write

T = TypeVar("T")


def _job() -> tuple[Path, str, list[str]]:
    """(output dir, job number, task overrides) of the running Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.get()
    return Path(hydra.runtime.output_dir), str(hydra.job.get("num")), list(hydra.overrides.task)


def failure_record(err: BaseException, overrides: list[str]) -> dict[str, Any]:
    """What ``failed.json`` holds: the reason in one line, and the traceback of an error that is
    not the user's to fix (a programming error, a crash in a library)."""
    if isinstance(err, SystemExit):  # fail() has printed its own "error:" line already
        return {"overrides": overrides, "error": f"stopped with exit status {err.code}",
                "type": "SystemExit"}
    cause = root_cause(err)
    record = {"overrides": overrides, "error": describe(err), "type": type(cause).__name__}
    if not isinstance(cause, USER_ERRORS):
        record["traceback"] = "".join(traceback.format_exception(err))
    return record


def run_job(body: Callable[[], T]) -> T | None:
    """``body()``; in a sweep job, a failure becomes ``failed.json`` and ``None`` (see the
    module doc). Ctrl-C still ends the whole sweep."""
    if not in_multirun():
        return body()
    try:
        return body()
    except KeyboardInterrupt:
        raise
    except (Exception, SystemExit) as err:
        if isinstance(err, SystemExit) and err.code in (0, None):
            raise
        out, num, overrides = _job()
        record = failure_record(err, overrides)
        if not is_secondary_process():
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / FAILED, json.dumps(record, indent=2) + "\n")
        print(f"error: job {num} ({out}): {record['error']}", file=sys.stderr, flush=True)
        return None
