"""The files a ``tarflow-sample`` job owns in its output folder, and what it does when the folder
already holds samples.

Sampling into a folder that holds another job's samples used to replace some PNGs and leave the
rest beside a summary that described only the new ones. ``if_exists`` now decides:

* ``refuse`` (default): stop before any work, saying what is there.
* ``overwrite``: delete every sample file the command owns there (``samples/<i>.png``, the NPZ
  files, grids and summaries; never ``.hydra/`` or logs, nor anything else), then sample.
* ``append``: add another index range of the *same* set (same checkpoint, sampler, seed, label,
  dtype and format) with ``first_index``; refused when a sample of the range is already there.
  A job that starts at index 0 writes ``samples.npz`` / ``grid.png`` / ``sample_summary.json``;
  one that starts at k writes ``samples_<k>-<last>.npz``, ``grid_<k>-<last>.png`` and
  ``sample_summary_<k>-<last>.json``, so shards of a large set never overwrite each other.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IF_EXISTS = ("refuse", "overwrite", "append")
_PNG = re.compile(r"^(\d+)\.png$")
# Files of the folder itself that a sampling job writes (the PNGs live in samples/).
_OWNED = ("samples.npz", "samples_*.npz", "grid.png", "grid_*.png", "sample_summary.json",
          "sample_summary_*.json")


@dataclass(frozen=True)
class SampleFiles:
    """Paths of one job's outputs: samples ``first .. first + count - 1`` in ``out``."""

    out: Path
    first: int
    count: int

    @property
    def suffix(self) -> str:
        return "" if self.first == 0 else f"_{self.first:06d}-{self.first + self.count - 1:06d}"

    @property
    def npz(self) -> Path:
        return self.out / f"samples{self.suffix}.npz"

    @property
    def grid(self) -> Path:
        return self.out / f"grid{self.suffix}.png"

    @property
    def summary(self) -> Path:
        return self.out / f"sample_summary{self.suffix}.json"

    def png(self, index: int) -> Path:
        return self.out / "samples" / f"{index:06d}.png"


def _owned_files(out: Path) -> tuple[list[int], list[Path]]:
    """(indices of the sample PNGs, the other owned files) found in ``out``."""
    pngs = sorted(int(m.group(1)) for p in (out / "samples").glob("*.png")
                  if (m := _PNG.match(p.name)))
    others = sorted({p for pattern in _OWNED for p in out.glob(pattern) if p.is_file()})
    return pngs, others


def _summaries(others: list[Path]) -> list[dict[str, Any]]:
    found = []
    for path in others:
        if path.suffix == ".json":
            try:
                found.append({"file": path.name, **json.loads(path.read_text())})
            except (OSError, ValueError):  # a half-written summary says nothing about its job
                continue
    return found


def check_out_dir(out: Path, *, if_exists: str, first: int, count: int,
                  job: dict[str, Any]) -> None:
    """Refuse an output folder the job would mix its samples into (see the module doc).

    Args:
        out: the output folder.
        if_exists: refuse | overwrite | append.
        first, count: the job's index range.
        job: what defines the sample set (checkpoint, sampler, seed, label, dtype, format);
            ``append`` requires the folder's earlier jobs to have the same.
    """
    if if_exists not in IF_EXISTS:
        raise ValueError(f"if_exists={if_exists!r} must be one of {IF_EXISTS}")
    pngs, others = _owned_files(out)
    if not pngs and not others or if_exists == "overwrite":
        return
    summaries = _summaries(others)
    ranges = [tuple(s["indices"]) for s in summaries if len(s.get("indices") or ()) == 2]
    following = max([*(i + 1 for i in pngs), *(b + 1 for _, b in ranges)], default=0)
    if if_exists == "refuse":
        what = [f"{len(pngs)} PNGs ({pngs[0]:06d}..{pngs[-1]:06d})"] if pngs else []
        what += [p.name for p in others]
        raise ValueError(
            f"out_dir {out} already holds samples ({', '.join(what)}); pass "
            f"if_exists=overwrite to replace them, if_exists=append first_index={following} "
            f"to add more of the same set, or choose another hydra.run.dir"
        )
    wanted = range(first, first + count)
    clash = sorted({i for i in pngs if i in wanted}
                   | {i for a, b in ranges for i in range(max(a, first), min(b, wanted[-1]) + 1)})
    if clash:
        raise ValueError(
            f"if_exists=append: out_dir {out} already holds samples {clash[0]}..{clash[-1]} of "
            f"the range {first}..{wanted[-1]}; start at first_index={following}"
        )
    for summary in summaries:
        theirs = summary.get("job") or {}
        differ = sorted(k for k in job if theirs.get(k) != job[k])
        if differ:
            raise ValueError(
                f"if_exists=append: {summary['file']} in {out} was sampled with other "
                f"{', '.join(differ)} than this job; append only more of the same set"
            )


def clear_outputs(out: Path) -> int:
    """Delete the sample files this command owns in ``out``; returns how many."""
    files = [p for p in (out / "samples").glob("*.png") if _PNG.match(p.name)]
    files += _owned_files(out)[1]
    for path in files:
        path.unlink()
    return len(files)
