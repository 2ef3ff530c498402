"""The files a ``tarflow-sample`` job owns in its output folder, and what it does when the folder
already holds samples (``if_exists``).

* ``refuse`` (default): stop before any work, saying what is there.
* ``resume``: continue the set the folder's ``sample_job.json`` records (shards,
  :mod:`tarflow.app.sample_shards`), drawing only the members no finished shard holds. Refused,
  naming the key, when this job would draw another set (other checkpoint, sampler, seed, N,
  label, dtype or device type). In an empty folder it simply starts, so a requeued SLURM job
  can always pass it.
* ``overwrite``: delete what the folder's records list (the job file's outputs, its shards
  and PNGs; or what an older job's ``sample_summary*.json`` names), then sample. Nothing else is
  touched: a user's ``samples_backup.npz`` or ``grid_final.png`` stays.

Whatever ``if_exists`` says, a file this job would write that no record there lists
(``samples.npz``, ``grid.png``, ``samples/000003.png``, ...) is refused rather than replaced.

``if_exists=append`` with ``first_index`` (by-hand shards of a set) is gone: it accepted another
sampler onto the samples of a killed job. Sharding over GPUs and resuming do its work.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tarflow.app.sample_shards import JOB_FILE, SampleFolder, differing_keys

IF_EXISTS = ("refuse", "overwrite", "resume")
NPZ, GRID, SUMMARY = "samples.npz", "grid.png", "sample_summary.json"
_PNG = re.compile(r"^(\d+)\.png$")
# Summaries of the jobs before sample_job.json existed (they name their own files).
_LEGACY = re.compile(r"^sample_summary(_\d+-\d+)?\.json$")


def png_path(out: Path, index: int) -> Path:
    return out / "samples" / f"{index:06d}.png"


def outputs_of(fmt: str, grid_size: int) -> list[str]:
    """Top-level files a job of this format writes besides ``sample_job.json``."""
    names = [SUMMARY] + ([NPZ] if fmt != "png" else []) + ([GRID] if grid_size > 0 else [])
    return sorted(names)


@dataclass
class Records:
    """What the folder's records say its sampling jobs wrote."""

    job: dict[str, Any] | None = None
    files: set[str] = field(default_factory=set)  # top-level names
    pngs: set[int] = field(default_factory=set)
    shards_of: int = 0  # shards of members 0..shards_of-1 are owned

    @property
    def holds_samples(self) -> bool:
        return bool(self.job is not None or self.files or self.pngs)


def read_records(out: Path) -> Records:
    rec = Records(job=SampleFolder(out).read_job())
    if rec.job is not None:
        n = int(rec.job["identity"]["num_samples"])
        rec.files |= {JOB_FILE, *rec.job.get("outputs", [])}
        rec.pngs |= set(range(n)) if rec.job.get("pngs") else set()
        rec.shards_of = n
    for path in sorted(out.glob("sample_summary*.json")) if out.is_dir() else []:
        if not _LEGACY.match(path.name) or path.name in rec.files:
            continue
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(old.get("job"), dict) or len(old.get("indices") or ()) != 2:
            continue  # not a summary an older tarflow-sample wrote
        rec.files.add(path.name)
        rec.files |= {Path(old[k]).name for k in ("npz", "grid") if old.get(k)}
        first, last = old["indices"]
        rec.pngs |= set(range(int(first), int(last) + 1))
    return rec


def _existing_pngs(out: Path) -> list[int]:
    folder = out / "samples"
    return sorted(int(m.group(1)) for p in folder.glob("*.png") if (m := _PNG.match(p.name))) \
        if folder.is_dir() else []


def check_out_dir(out: Path, *, if_exists: str, identity: dict[str, Any], fmt: str,
                  grid_size: int) -> dict[str, Any] | None:
    """Refuse an output folder the job would mix its samples into (see the module doc).

    Args:
        out: the output folder.
        if_exists: refuse | overwrite | resume.
        identity: the job's :func:`~tarflow.app.sample_shards.set_identity`.
        fmt, grid_size: what the job writes (png | npz | both; grid images).

    Returns:
        The recorded job that ``resume`` continues (None: the job starts afresh).
    """
    if if_exists == "append":
        raise ValueError("if_exists=append (with first_index) was replaced by if_exists=resume: "
                         "a killed job continues where it stopped, and torchrun/SLURM split a "
                         "set over GPUs; see tarflow-sample --help")
    if if_exists not in IF_EXISTS:
        raise ValueError(f"if_exists={if_exists!r} must be one of {IF_EXISTS}")
    rec = read_records(out)
    n = identity["num_samples"]
    if rec.holds_samples and if_exists == "refuse":
        what = (f"{JOB_FILE} of {rec.job['identity']['num_samples']} samples, "
                f"{len(SampleFolder(out).done())} shard(s) done" if rec.job is not None
                else ", ".join(sorted(rec.files)) or f"{len(rec.pngs)} PNGs")
        raise ValueError(f"out_dir {out} already holds samples ({what}); pass if_exists=resume "
                         f"to finish that set, if_exists=overwrite to replace it, or choose "
                         f"another hydra.run.dir")
    resumed = None
    if if_exists == "resume" and rec.holds_samples:
        if rec.job is None:
            raise ValueError(f"if_exists=resume: out_dir {out} holds samples of an older "
                             f"tarflow-sample without {JOB_FILE}; pass if_exists=overwrite or "
                             f"choose another hydra.run.dir")
        differ = differing_keys(rec.job["identity"], identity)
        if differ:
            key, theirs, ours = differ[0]
            more = f"; also {', '.join(k for k, _, _ in differ[1:])}" if differ[1:] else ""
            raise ValueError(f"if_exists=resume: out_dir {out} holds another sample set "
                             f"({key}: {theirs!r} there, {ours!r} here{more}); resume with the "
                             f"same settings, or choose another hydra.run.dir")
        resumed = rec.job
    owned = rec if if_exists != "refuse" else Records()
    clash = [name for name in (JOB_FILE, *outputs_of(fmt, grid_size))
             if (out / name).exists() and name not in owned.files]
    if owned.job is None and SampleFolder(out).done():
        clash.append("shards/*.npz")
    if fmt != "npz":
        clash += [f"samples/{i:06d}.png" for i in _existing_pngs(out)
                  if i < n and i not in owned.pngs][:3]
    if clash:
        raise ValueError(f"out_dir {out} holds {', '.join(clash)}, which no tarflow-sample "
                         f"record there lists; it is never replaced: move it, or choose "
                         f"another hydra.run.dir")
    return resumed


def clear_outputs(out: Path) -> int:
    """Delete the sample files the folder's records list (see the module doc); returns how
    many. Logs and ``.hydra`` records stay."""
    rec = read_records(out)
    removed = SampleFolder(out).remove_shards(rec.shards_of)
    for name in sorted(rec.files - {JOB_FILE}) + [JOB_FILE]:
        if name in rec.files and (out / name).is_file():
            (out / name).unlink()
            removed += 1
    for i in rec.pngs:
        if png_path(out, i).is_file():
            png_path(out, i).unlink()
            removed += 1
    if (out / "samples").is_dir() and not any((out / "samples").iterdir()):
        (out / "samples").rmdir()
    return removed
