"""The Pareto front of a ``tarflow-eval`` sweep: seconds per image against FID@N.

Written at the end of every evaluation sweep (a grid such as ``hparams_search=gs_jacobi_grid``,
or the Optuna search ``hparams_search=optuna_sampler``) from the files its jobs left, so it also
works on a stopped sweep:

    python -m tarflow.app.search_report <sweep dir> [--mark auto=<run dir>/eval.json]

``<sweep dir>/pareto.md`` has the front (the settings no other job beats on both speed and
FID), fastest first, with each job's swept values, and ``pareto.png`` draws every job and the
front. ``--mark NAME=eval.json`` adds a reference run (the planner's ``auto`` choice, say) to
both and says whether it is on the front. Objectives are read from ``eval.json``'s stable keys:
``val/fid_<N>`` and ``seconds_per_image``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tarflow.eval.pareto import dominates, pareto_chart, pareto_front
from tarflow.files import atomic_write

TABLE, CHART = "pareto.md", "pareto.png"


@dataclass(frozen=True)
class Point:
    """One evaluated sampler setting: job name, seconds per image, FID, its overrides."""

    name: str
    seconds: float
    fid: float
    fid_key: str
    overrides: dict[str, str]

    @property
    def xy(self) -> tuple[float, float]:
        return (self.seconds, self.fid)


def read_point(path: Path, name: str) -> Point | None:
    """The objectives of one ``eval.json`` (None: unreadable, or without FID or timing)."""
    try:
        result: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keys = sorted(k for k in result if k.startswith("val/fid_"))
    seconds = result.get("seconds_per_image")
    if not keys or not isinstance(seconds, (int, float)):
        return None
    fid = result[keys[0]]
    if not isinstance(fid, (int, float)) or not math.isfinite(fid):
        return None
    given = dict(o.split("=", 1) for o in result.get("overrides", []) if "=" in o)
    return Point(name, float(seconds), float(fid), keys[0], given)


def sweep_points(sweep: Path) -> list[Point]:
    """The points of every job folder (named by job number) that finished."""
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()),
                  key=lambda p: int(p.name))
    return [p for job in jobs if (p := read_point(job / "eval.json", job.name)) is not None]


def _short(value: str) -> str:
    """A searched float in 4 significant digits (Optuna suggests 0.0011205837185064174)."""
    try:
        return f"{float(value):.4g}" if any(c in value for c in ".e") else value
    except ValueError:
        return value


def _table(points: list[Point], front: list[int], marks: dict[str, Point]) -> str:
    keys = sorted({k for p in points for k in p.overrides})
    varying = [k for k in keys if len({p.overrides.get(k) for p in points}) > 1]
    fid_key = points[0].fid_key if points else "val/fid"
    head = ["job", "s/image", fid_key, *varying]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i in front:
        p = points[i]
        cells = [p.name, f"{p.seconds:.4g}", f"{p.fid:.4g}",
                 *(_short(p.overrides.get(k, "-")) for k in varying)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"{len(front)} of {len(points)} finished jobs are on the front (lower is "
                 f"better on both axes).")
    for name, mark in marks.items():
        beaten = [points[i].name for i in front if dominates(points[i].xy, mark.xy)]
        where = (f"dominated by job(s) {', '.join(beaten)}" if beaten
                 else "on the front (no job beats it on both)")
        lines.append(f"{name}: {mark.seconds:.4g} s/image, {mark.fid_key} {mark.fid:.4g}: "
                     f"{where}.")
    return "\n".join(lines)


def write_report(sweep: Path, marks: dict[str, Path] | None = None) -> Path | None:
    """Write ``pareto.md`` and ``pareto.png`` into ``sweep``; None when fewer than two jobs
    finished (no front to speak of). Returns the table's path."""
    points = sweep_points(sweep)
    if len(points) < 2:
        return None
    marked = {name: p for name, path in (marks or {}).items()
              if (p := read_point(Path(path), name)) is not None}
    front = pareto_front([p.xy for p in points])
    table = _table(points, front, marked)
    atomic_write(sweep / TABLE, table + "\n")
    chart = pareto_chart([p.xy for p in points], front, labels=[p.name for p in points],
                         marks={n: p.xy for n, p in marked.items()},
                         ylabel=points[0].fid_key.replace("val/", ""),
                         title=f"{sweep.name}: speed vs quality")
    chart.save(sweep / CHART)
    print(f"Pareto front ({sweep / TABLE}, {sweep / CHART}):\n{table}", flush=True)
    return sweep / TABLE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tarflow.app.search_report",
        description="Write the speed/quality Pareto front of a tarflow-eval sweep folder.")
    parser.add_argument("sweep", type=Path, help="the sweep folder (its job folders 0, 1, ...)")
    parser.add_argument("--mark", action="append", default=[], metavar="NAME=EVAL_JSON",
                        help="a reference run to place beside the front (repeatable)")
    args = parser.parse_args(argv)
    marks = dict(m.split("=", 1) for m in args.mark if "=" in m)
    if not args.sweep.is_dir():
        parser.error(f"{args.sweep} is not a folder")
    if write_report(args.sweep, {k: Path(v) for k, v in marks.items()}) is None:
        parser.error(f"{args.sweep} holds fewer than two finished evaluation jobs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
