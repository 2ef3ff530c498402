"""The table at the end of a ``tarflow-eval --multirun`` sweep (a Hydra callback in eval.yaml).

Each job writes ``<sweep dir>/<job>/eval.json``; comparing a grid of schedules meant opening one
file per job. :class:`SweepSummary` reads them all when the sweep ends (also when a job failed)
and prints one Markdown table, written to ``<sweep dir>/summary.md`` as well: a row per job, a
column per override that differs between jobs, then bits/dim, FID, seconds per image and the
total of the mean Jacobi iterations per block.
"""

from __future__ import annotations

import json
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


def _job_rows(sweep: Path) -> list[tuple[str, dict[str, Any] | None]]:
    """(job directory name, its eval.json or None when the job left none), in job order."""
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()),
                  key=lambda p: int(p.name))
    rows = []
    for job in jobs:
        try:
            rows.append((job.name, json.loads((job / "eval.json").read_text())))
        except (OSError, ValueError):
            rows.append((job.name, None))
    return rows


def summary_table(sweep: Path) -> str:
    """The Markdown table of a sweep directory's jobs (see the module doc)."""
    rows = _job_rows(sweep)
    overrides = [dict(o.split("=", 1) for o in (r or {}).get("overrides", []) if "=" in o)
                 for _, r in rows]
    keys = sorted({k for o in overrides for k in o})
    varying = [k for k in keys if len({o.get(k) for o in overrides}) > 1]
    metrics = sorted({k for _, r in rows for k in (r or {}) if k.startswith("val/")})
    head = ["job", *varying, *metrics, "s/image", "iterations"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (job, result), given in zip(rows, overrides, strict=True):
        if result is None:
            cells = [job, *(given.get(k) for k in varying), "failed: no eval.json"]
            cells += [""] * (len(head) - len(cells))
        else:
            iters = result.get("iters_per_block")
            cells = [job, *(given.get(k) for k in varying), *(result.get(k) for k in metrics),
                     result.get("seconds_per_image"),
                     sum(iters.values()) if isinstance(iters, dict) and iters else None]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


class SweepSummary(Callback):
    """Prints and saves the sweep's table when a ``--multirun`` ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        if not sweep.is_dir():
            return
        table = summary_table(sweep)
        (sweep / "summary.md").write_text(table + "\n")
        print(f"\nsweep summary ({sweep / 'summary.md'}):\n{table}")
