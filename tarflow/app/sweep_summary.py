"""The table at the end of a ``--multirun`` sweep (a Hydra callback in eval.yaml and train.yaml).

Each job writes ``<sweep dir>/<job>/eval.json`` (``tarflow-eval``) or ``train.json``
(``tarflow-train``); comparing a grid of schedules or learning rates meant opening one file per
job. :class:`SweepSummary` reads them all when the sweep ends (also when a job failed) and prints
one Markdown table, written to ``<sweep dir>/summary.md`` as well: a row per job, a column per
override that differs between jobs, then the final ``val/*`` metrics (bits/dim, NLL, FID) and,
for evaluation, seconds per image and the total of the mean Jacobi iterations per block; for
training, the final training loss and the minutes the job took.

Every job has a row, a failed one too: ``failed: <reason>`` from the job's ``failed.json``
(:mod:`tarflow.app.sweep_jobs`), or ``failed: no <result file>`` when the job left neither (it
was killed: see its log, or ``.submitit/`` under the submitit launchers). A sweep with a
failed job exits with status 1 after the table. When a launcher gives up before the sweep's
end (a crashed submitit job), :func:`finish_interrupted` writes the table of what is there.
Evaluation sweeps also get their speed/quality Pareto front (:mod:`tarflow.app.search_report`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from tarflow.app.runs import records_dirs
from tarflow.files import atomic_write

FAILED = "failed.json"  # a failed sweep job's reason (tarflow/app/sweep_jobs.py)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _iterations(result: dict[str, Any]) -> int | None:
    iters = result.get("iters_per_block")
    return sum(iters.values()) if isinstance(iters, dict) and iters else None


def _minutes(result: dict[str, Any]) -> float | None:
    seconds = result.get("seconds")
    return None if seconds is None else float(seconds) / 60


# Columns after the val/* metrics, per kind of job result: (header, value of a result).
COLUMNS: dict[str, list[tuple[str, Callable[[dict[str, Any]], Any]]]] = {
    "eval.json": [("s/image", lambda r: r.get("seconds_per_image")), ("iterations", _iterations)],
    "train.json": [("train/loss", lambda r: r.get("train/loss")), ("minutes", _minutes)],
    "sample_summary.json": [("s/image", lambda r: r.get("seconds_per_image")),
                            ("iterations", _iterations)],
}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def job_dirs(sweep: Path) -> list[Path]:
    """The sweep's job folders (named by the job number), in job order."""
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()),
                  key=lambda p: int(p.name))


def _job_rows(sweep: Path, result_file: str = "eval.json",
              ) -> list[tuple[str, dict[str, Any] | None, str | None]]:
    """(job directory name, its result or None, why it failed or None), in job order."""
    rows = []
    for job in job_dirs(sweep):
        result = _read(job / result_file)
        failed = _read(job / FAILED)
        if failed is not None and (result is None or (job / FAILED).stat().st_mtime
                                   >= (job / result_file).stat().st_mtime):
            # A failed attempt after an earlier result (a resumed job failing) counts.
            rows.append((job.name, failed, str(failed.get("error") or "unknown error")))
        elif result is None:
            rows.append((job.name, None, f"no {result_file} (killed? see the job's log)"))
        else:
            if "overrides" not in result:  # sample_summary.json: the job's own records say
                records = records_dirs(job)
                overrides = _read_yaml(records[-1] / "overrides.yaml") if records else None
                result = {**result, "overrides": overrides or []}
            rows.append((job.name, result, None))
    return rows


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def summary_table(sweep: Path, result_file: str = "eval.json") -> str:
    """The Markdown table of a sweep directory's jobs (see the module doc)."""
    rows = _job_rows(sweep, result_file)
    extra = COLUMNS.get(result_file, [])
    overrides = [dict(o.split("=", 1) for o in (r or {}).get("overrides", []) if "=" in o)
                 for _, r, _ in rows]
    keys = sorted({k for o in overrides for k in o})
    varying = [k for k in keys if len({o.get(k) for o in overrides}) > 1]
    metrics = sorted({k for _, r, why in rows if why is None for k in r if k.startswith("val/")})
    head = ["job", *varying, *metrics, *(name for name, _ in extra)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (job, result, why), given in zip(rows, overrides, strict=True):
        if why is not None:
            # One cell, whatever the reason says: "|" would split it.
            cells = [job, *(given.get(k) for k in varying), "failed: " + why.replace("|", "/")]
            cells += [""] * (len(head) - len(cells))
        else:
            cells = [job, *(given.get(k) for k in varying), *(result.get(k) for k in metrics),
                     *(value(result) for _, value in extra)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def failed_jobs(sweep: Path, result_file: str = "eval.json") -> list[str]:
    """The job folders of the sweep whose job failed or left no result."""
    return [job for job, _, why in _job_rows(sweep, result_file) if why is not None]


def write_summary(sweep: Path, result_file: str = "eval.json") -> list[str]:
    """Print and write ``<sweep>/summary.md`` (and an evaluation sweep's Pareto front);
    returns the failed jobs."""
    table = summary_table(sweep, result_file)
    atomic_write(sweep / "summary.md", table + "\n")
    print(f"\nsweep summary ({sweep / 'summary.md'}):\n{table}", flush=True)
    if result_file == "eval.json":
        from tarflow.app.search_report import write_report

        write_report(sweep)
    return failed_jobs(sweep, result_file)


# The sweep this process runs, until its summary is written: (sweep dir, result file).
_PENDING: list[tuple[Path, str]] = []


def finish_interrupted() -> None:
    """Write the summary of a sweep that ended before Hydra's end-of-sweep callbacks ran (a
    launcher that gave up on a crashed job). Called by :func:`tarflow.app.errors.cli_main`."""
    while _PENDING:
        sweep, result_file = _PENDING.pop()
        if sweep.is_dir() and job_dirs(sweep):
            try:
                write_summary(sweep, result_file)
            except Exception as err:  # the original failure is what the user must see
                print(f"(no sweep summary: {type(err).__name__}: {err})", file=sys.stderr)


class SweepSummary(Callback):
    """Prints and saves the sweep's table when a ``--multirun`` ends; exits with status 1
    when a job failed (after the table, which says which and why).

    Args:
        result_file: the file each job writes into its directory (``eval.json``,
            ``train.json``, ``sample_summary.json``).
    """

    def __init__(self, result_file: str = "eval.json") -> None:
        self.result_file = result_file

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _PENDING[:] = [(Path(str(config.hydra.sweep.dir)), self.result_file)]

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        _PENDING.clear()
        if not sweep.is_dir():
            return
        failed = write_summary(sweep, self.result_file)
        if failed:
            print(f"error: {len(failed)} of {len(job_dirs(sweep))} jobs failed (jobs "
                  f"{', '.join(failed)}; the table says why)", file=sys.stderr, flush=True)
            raise SystemExit(1)
