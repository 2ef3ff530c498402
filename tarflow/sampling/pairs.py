"""Writing a distillation pair set: the teacher's samples of fixed members, rank-sharded, resumable.

Member ``i`` is the teacher's sample of fixed-set member ``i`` at the set's seed (noise from seed
``seed + i``, then its label; :func:`fixed_inputs`), so any rank, world size, batch size or
restart draws the same pair. Shards hold fixed member ranges ``[k S, (k + 1) S)``; rank ``r`` of
``W`` writes shards ``r, r + W, ...``, each atomically once complete, and skips those already on
disk: a killed run resumes where it stopped and loses at most one shard per rank. The layout and
the reader are in :mod:`tarflow.data.pairs`.

A pair set belongs to one teacher and one sampler: the manifest records the teacher's weights
fingerprint, its sampler (schedule, tolerance, guidance) and the seed, and writing into a folder
made for anything else is refused in one line. ``x`` is the flow's output before any
self-denoising (the tokens the student learns, and the teacher's exact sampler solves for).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tarflow.data.pairs import (
    KIND,
    MANIFEST,
    num_shards,
    read_manifest,
    read_shard,
    shard_members,
    shard_path,
)
from tarflow.files import atomic_torch_save, atomic_write
from tarflow.model import TarFlow
from tarflow.sampling.plan import fingerprint
from tarflow.sampling.sample import sample
from tarflow.sampling.sample_set import fixed_inputs
from tarflow.sampling.schedule import SamplingSchedule

# Manifest fields that must match to add to (or resume) a pair set.
IDENTITY = ("teacher_fingerprint", "sampler", "seed", "shard_size")


def pair_identity(teacher: TarFlow, schedule: SamplingSchedule, knobs: dict[str, Any], *,
                  seed: int, shard_size: int, teacher_path: str = "") -> dict[str, Any]:
    """The manifest of a pair set of ``teacher`` sampled with ``schedule`` and ``knobs``."""
    if knobs.get("denoise"):
        raise ValueError(f"pairs.sampler.denoise={knobs['denoise']}: a pair set holds the "
                         f"flow's own samples (the student's targets, and the fixed point of the "
                         f"teacher's exact sampler); self-denoising is not distilled, use 0")
    guidance = {k: knobs[k] for k in ("guidance", "attn_temp", "annealed", "guidance_rule")
                if k in knobs}
    cfg = teacher.config
    return {"kind": KIND, "version": 1, "teacher_fingerprint": fingerprint(teacher),
            "teacher_path": str(teacher_path), "teacher_config": cfg.to_dict(),
            "sampler": {"schedule": schedule.describe(), **guidance}, "seed": int(seed),
            "shard_size": int(shard_size), "token_shape": [cfg.num_patches, cfg.token_dim]}


def check_identity(directory: str | Path, manifest: dict | None, wanted: dict) -> None:
    """Refuse a folder whose pair set was made by another teacher, sampler or seed."""
    if manifest is None:
        return
    for key in IDENTITY:
        if manifest.get(key) != wanted.get(key):
            what = ("another teacher" if key == "teacher_fingerprint" else f"another {key}")
            raise ValueError(
                f"pair set {directory} was made from {what} ({key} {manifest.get(key)!r}, "
                f"from {manifest.get('teacher_path') or '?'}; this run: {wanted.get(key)!r}); "
                f"use another pairs folder or delete that one")


@torch.no_grad()
def write_pairs(teacher: TarFlow, directory: str | Path, *, count: int,
                schedule: SamplingSchedule | None = None, knobs: dict[str, Any] | None = None,
                seed: int = 1_000_000, shard_size: int = 256, batch_size: int = 64,
                rank: int = 0, world_size: int = 1, teacher_path: str = "",
                on_shard: Callable[[int, int], None] | None = None) -> list[int]:
    """Write the shards of members ``[0, count)`` that rank ``rank`` of ``world_size`` owns
    and that are not on disk yet.

    Args:
        teacher: the TarFlow, in eval mode (its dtype and device sample).
        directory: the pair set's folder (created; its manifest checked or written).
        count: members the set must hold.
        schedule, knobs: the teacher's sampler (default: the exact sequential loop, no
            guidance); ``knobs`` as for :func:`tarflow.sampling.sample`, without denoise.
        seed: the set's base seed. Keep it apart from the seeds FID is measured on (0 by
            default): a student must not be scored on the noises it learnt.
        shard_size: members per shard (the most a killed run re-draws per rank).
        batch_size: members per sampler call.
        on_shard: called with (shard id, members) after each shard is written (progress;
            tests stop a run there).

    Returns:
        The shard ids written by this call.

    Raises:
        ValueError: the folder holds pairs of another teacher, sampler, seed or shard size.
    """
    if count < 1 or shard_size < 1 or batch_size < 1:
        raise ValueError(f"count={count}, shard_size={shard_size} and batch_size={batch_size} "
                         f"must be >= 1")
    directory = Path(directory)
    schedule = schedule or SamplingSchedule.sequential()
    knobs = dict(knobs or {})
    wanted = pair_identity(teacher, schedule, knobs, seed=seed, shard_size=shard_size,
                           teacher_path=teacher_path)
    check_identity(directory, read_manifest(directory), wanted)
    if not (directory / MANIFEST).is_file():  # every rank writes the same bytes: idempotent
        atomic_write(directory / MANIFEST, json.dumps(wanted, indent=2))
    written = []
    for k in range(rank, num_shards(count, shard_size), world_size):
        members = shard_members(k, shard_size, count)
        if read_shard(directory, k, members) is not None:
            continue  # drawn by an earlier (killed or shorter) run
        zs, xs, ys, iters = [], [], [], torch.zeros(teacher.config.num_blocks)
        for start in range(members.start, members.stop, batch_size):
            chunk = range(start, min(start + batch_size, members.stop))
            noise, y = fixed_inputs(teacher, chunk, seed)
            images, stats = sample(teacher, noise, y, schedule, **knobs)
            zs.append(noise.float().cpu())
            xs.append(teacher.patchify(images).float().cpu())  # (n, N, D) tokens
            ys.append(y.cpu() if y is not None else torch.full((len(chunk),), -1))
            for b, n in stats.iters.items():
                iters[b] += n
        atomic_torch_save({"indices": torch.tensor(list(members)), "z": torch.cat(zs),
                           "x": torch.cat(xs), "y": torch.cat(ys), "iters": iters},
                          shard_path(directory, k))
        written.append(k)
        if on_shard is not None:
            on_shard(k, len(members))
    return written


def missing_shards(directory: str | Path, count: int, shard_size: int) -> list[int]:
    """Shards of members ``[0, count)`` not (completely) on disk."""
    return [k for k in range(num_shards(count, shard_size))
            if read_shard(directory, k, shard_members(k, shard_size, count)) is None]
