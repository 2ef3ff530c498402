"""A fixed sample set drawn on any number of ranks into shard files, resumable after a kill.

The folder of one set (``tarflow-sample``'s output folder; ``tarflow-eval`` may use the same
functions for its FID samples) holds:

* ``sample_job.json``: what defines the set (:func:`set_identity`: checkpoint fingerprint,
  sampler, seed, N, label, dtype, device type), the schedule it samples with (rank 0's plan for
  ``schedule: auto``, so a resumed job never plans again) and the outputs the job writes. It is
  written atomically *before* the first sample, so a folder left by a killed job always says
  which set it belongs to.
* ``shards/<first>-<last>.npz``: members ``first..last`` (six or more digits each) as ``images``
  (n, H, W, C) uint8, ``labels`` (n,) int64 (zeros for an unconditional model), ``indices`` and
  ``tally`` (the sampler's cost, :class:`~tarflow.sampling.sample_set.IterationTally` as a
  vector, plus the decode seconds). Written through :func:`tarflow.files.atomic_write`, so a
  shard either exists whole or not at all; the hidden temporary files of a killed write
  (``.<name>.<random>.tmp``) never match the shard pattern and are never read.

Shards have a fixed size (``shard_size`` members, the last one shorter) that does not depend on
the number of ranks; which ranks draw them does not matter, because member *i* starts from seed
``seed + i`` (:func:`tarflow.sampling.sample_set.fixed_inputs`). The shards still missing are
dealt to ranks by :func:`tarflow.sampling.sample_set.shard_indices` (the split the validation
callback uses for members), so a resume on another number of ranks draws only what is missing.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tarflow.files import atomic_write
from tarflow.sampling.sample_set import shard_indices

JOB_FILE = "sample_job.json"
SHARDS = "shards"
_SHARD = re.compile(r"^(\d+)-(\d+)\.npz$")
# The temporary file of a shard write killed midway (tarflow/files.py names them so).
_SHARD_TMP = re.compile(r"^\.\d+-\d+\.npz\..+\.tmp$")


def file_fingerprint(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes (a copy of a checkpoint on another machine matches; a
    retrained ``last.ckpt`` at the same path does not)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def set_identity(*, checkpoint: str, sampler: dict[str, Any], seed: int, num_samples: int,
                 label: int | None, dtype: str, device_type: str) -> dict[str, Any]:
    """What defines a sample set's members: a folder of shards may only be continued by a job
    with the same identity (``checkpoint`` is :func:`file_fingerprint` of the weights file)."""
    return {"checkpoint": checkpoint, "sampler": dict(sampler), "seed": int(seed),
            "num_samples": int(num_samples), "label": None if label is None else int(label),
            "dtype": str(dtype), "device_type": str(device_type)}


def differing_keys(recorded: dict[str, Any], current: dict[str, Any],
                   prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, recorded value, current value)`` for every key whose values differ
    (nested dicts compared key by key, so ``sampler.schedule`` is named, not ``sampler``)."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def shard_name(first: int, last: int) -> str:
    return f"{first:06d}-{last:06d}.npz"


def missing_shards(total: int, done: Sequence[tuple[int, int]],
                   shard_size: int) -> list[tuple[int, int]]:
    """``(first, last)`` of the shards still to draw: the members of ``0..total-1`` that no
    finished shard covers, cut at multiples of ``shard_size`` (a fresh job's layout)."""
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1")
    covered = np.zeros(total, dtype=bool)
    for a, b in done:
        covered[max(a, 0):min(b, total - 1) + 1] = True
    todo, start = [], None
    for i in range(total + 1):
        boundary = i == total or covered[i] or (start is not None and i % shard_size == 0)
        if start is not None and boundary:
            todo.append((start, i - 1))
            start = None
        if i < total and not covered[i] and start is None:
            start = i
    return todo


def deal(shards: Sequence[tuple[int, int]], rank: int, world_size: int) -> list[tuple[int, int]]:
    """The shards rank ``rank`` draws (every ``world_size``-th, as members are dealt in
    validation)."""
    return [shards[k] for k in shard_indices(len(shards), rank, world_size)]


@dataclass
class Shard:
    """One finished shard, read back."""

    indices: np.ndarray  # (n,) int64
    images: np.ndarray  # (n, H, W, C) uint8
    labels: np.ndarray  # (n,) int64
    tally: np.ndarray  # (4 + T + 1,) float64: IterationTally vector, then decode seconds


class SampleFolder:
    """The job file and shards of one sample set in ``root`` (see the module doc)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def job_path(self) -> Path:
        return self.root / JOB_FILE

    @property
    def shard_dir(self) -> Path:
        return self.root / SHARDS

    def read_job(self) -> dict[str, Any] | None:
        """The recorded job (None when there is none)."""
        if not self.job_path.is_file():
            return None
        try:
            return json.loads(self.job_path.read_text())
        except ValueError as err:  # written atomically: only a hand edit can break it
            raise ValueError(f"{self.job_path} is not valid JSON ({err}); move the folder "
                             f"aside or pass if_exists=overwrite") from None

    def write_job(self, job: dict[str, Any]) -> None:
        atomic_write(self.job_path, json.dumps(job, indent=2))

    def done(self) -> list[tuple[int, int]]:
        """``(first, last)`` of every finished shard, sorted (temporary files are skipped)."""
        found = []
        if self.shard_dir.is_dir():
            for path in self.shard_dir.iterdir():
                if match := _SHARD.match(path.name):
                    found.append((int(match.group(1)), int(match.group(2))))
        return sorted(found)

    def write_shard(self, indices: Sequence[int], images: np.ndarray, labels: np.ndarray,
                    tally: np.ndarray) -> Path:
        """Write members ``indices`` (contiguous) as one shard, atomically."""
        path = self.shard_dir / shard_name(int(indices[0]), int(indices[-1]))
        buffer = io.BytesIO()
        np.savez(buffer, indices=np.asarray(indices, np.int64), images=images,
                 labels=np.asarray(labels, np.int64), tally=np.asarray(tally, np.float64))
        return atomic_write(path, buffer.getvalue())

    def read_shard(self, first: int, last: int) -> Shard:
        with np.load(self.shard_dir / shard_name(first, last)) as z:
            return Shard(z["indices"], z["images"], z["labels"], z["tally"])

    def shards_of_rank(self, rank: int = 0, world_size: int = 1) -> Iterator[Shard]:
        """The finished shards dealt to ``rank`` (a metric computed where the shards lie, e.g.
        Inception features summed over ranks, reads its part here)."""
        for first, last in deal(self.done(), rank, world_size):
            yield self.read_shard(first, last)

    def assemble(self, total: int) -> Shard:
        """Members ``0..total-1`` from the shards, in order, with the summed tally.

        Raises:
            ValueError: a member is missing or drawn twice (shards of two jobs).
        """
        done = self.done()
        counts = np.zeros(total, np.int64)
        for a, b in done:
            counts[a:b + 1] += 1
        if (counts != 1).any() or any(b >= total for _, b in done):
            bad = int(np.flatnonzero(counts != 1)[0]) if (counts != 1).any() else total
            raise ValueError(f"{self.shard_dir}: member {bad} is missing or in two shards; "
                             f"re-run with if_exists=resume")
        parts = [self.read_shard(a, b) for a, b in done]
        return Shard(np.concatenate([p.indices for p in parts]),
                     np.concatenate([p.images for p in parts]),
                     np.concatenate([p.labels for p in parts]),
                     np.sum([p.tally for p in parts], axis=0))

    def remove_shards(self, total: int) -> int:
        """Delete the shards of members ``0..total-1`` and the temporary files of killed shard
        writes (nothing else in ``shards/``); the folder too once empty. Returns how many."""
        if not self.shard_dir.is_dir():
            return 0
        removed = 0
        for path in self.shard_dir.iterdir():
            match = _SHARD.match(path.name)
            ours = match and int(match.group(2)) < total or _SHARD_TMP.match(path.name)
            if ours and path.is_file():
                path.unlink()
                removed += 1
        if not any(self.shard_dir.iterdir()):
            self.shard_dir.rmdir()
        return removed


def save_adm_npz(path: str | Path, images: np.ndarray, labels: np.ndarray,
                 indices: np.ndarray) -> Path:
    """The sample set as ADM's evaluator and DiT's ``sample_ddp.py`` lay it out: ``arr_0``
    (N, H, W, C) uint8 and ``arr_1`` (N,) int64 labels (zeros for an unconditional model);
    ``indices`` (N,) says which members (0..N-1). Written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=np.ascontiguousarray(images, np.uint8),
             arr_1=np.asarray(labels, np.int64), indices=np.asarray(indices, np.int64))
    return atomic_write(path, buffer.getvalue())
