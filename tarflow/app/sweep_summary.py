"""The table at the end of a ``--multirun`` sweep (a Hydra callback in eval.yaml and train.yaml).

Each job writes ``<sweep dir>/<job>/eval.json`` (``tarflow-eval``) or ``train.json``
(``tarflow-train``); comparing a grid of schedules or learning rates meant opening one file per
job. :class:`SweepSummary` reads them all when the sweep ends (also when a job failed) and prints
one Markdown table, written to ``<sweep dir>/summary.md`` as well: a row per job, a column per
override that differs between jobs, then the final ``val/*`` metrics (bits/dim, NLL, FID) and,
for evaluation, seconds per image and the total of the mean Jacobi iterations per block; for
training, the final training loss and the minutes the job took.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


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
}


def _job_rows(sweep: Path, result_file: str = "eval.json",
              ) -> list[tuple[str, dict[str, Any] | None]]:
    """(job directory name, its result file or None when the job left none), in job order."""
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()),
                  key=lambda p: int(p.name))
    rows = []
    for job in jobs:
        try:
            rows.append((job.name, json.loads((job / result_file).read_text())))
        except (OSError, ValueError):
            rows.append((job.name, None))
    return rows


def summary_table(sweep: Path, result_file: str = "eval.json") -> str:
    """The Markdown table of a sweep directory's jobs (see the module doc)."""
    rows = _job_rows(sweep, result_file)
    extra = COLUMNS.get(result_file, [])
    overrides = [dict(o.split("=", 1) for o in (r or {}).get("overrides", []) if "=" in o)
                 for _, r in rows]
    keys = sorted({k for o in overrides for k in o})
    varying = [k for k in keys if len({o.get(k) for o in overrides}) > 1]
    metrics = sorted({k for _, r in rows for k in (r or {}) if k.startswith("val/")})
    head = ["job", *varying, *metrics, *(name for name, _ in extra)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (job, result), given in zip(rows, overrides, strict=True):
        if result is None:
            cells = [job, *(given.get(k) for k in varying), f"failed: no {result_file}"]
            cells += [""] * (len(head) - len(cells))
        else:
            cells = [job, *(given.get(k) for k in varying), *(result.get(k) for k in metrics),
                     *(value(result) for _, value in extra)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


class SweepSummary(Callback):
    """Prints and saves the sweep's table when a ``--multirun`` ends.

    Args:
        result_file: the file each job writes into its directory (``eval.json``,
            ``train.json``).
    """

    def __init__(self, result_file: str = "eval.json") -> None:
        self.result_file = result_file

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        if not sweep.is_dir():
            return
        table = summary_table(sweep, self.result_file)
        (sweep / "summary.md").write_text(table + "\n")
        print(f"\nsweep summary ({sweep / 'summary.md'}):\n{table}")
