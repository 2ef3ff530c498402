"""A distillation pair set on disk: noise ``z`` and the teacher's sample ``x`` of fixed members.

Member ``i`` of a pair set is member ``i`` of the teacher's fixed sample set at the pair set's
seed (``tarflow.sampling.sample_set.fixed_inputs``: noise from seed ``seed + i``, then its label),
sampled by the teacher's sampler recorded in the manifest. The files, all written atomically
(``tarflow.files``) by :func:`tarflow.sampling.pairs.write_pairs`::

    <dir>/manifest.json          teacher (path, fingerprint, config), sampler, seed, shard size
    <dir>/shard_000000.pt        members [0, S): indices (n,), z and x (n, N, D) float32 tokens,
    <dir>/shard_000001.pt        y (n,) int64 (-1 for an unconditional teacher), iters (T,)
    ...

``z`` is stored although it is a function of the seed: the reader then needs nothing of the
sampler (ring 1's data package imports no sampling code), and a test checks the two agree.
This module only reads; :class:`PairSet` serves ``(z, x, y)`` items to a DataLoader.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

MANIFEST = "manifest.json"
KIND = "tarflow-pairs"


def shard_path(directory: str | Path, k: int) -> Path:
    return Path(directory) / f"shard_{k:06d}.pt"


def shard_members(k: int, shard_size: int, count: int) -> range:
    """The members shard ``k`` holds in a set of ``count``."""
    return range(k * shard_size, min((k + 1) * shard_size, count))


def num_shards(count: int, shard_size: int) -> int:
    return -(-count // shard_size)


def read_manifest(directory: str | Path) -> dict | None:
    """The pair set's manifest, or None when the folder has none yet.

    Raises:
        ValueError: a manifest that is not a pair set's.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("kind") != KIND:
        raise ValueError(f"{path} is not a pair set's manifest (kind {manifest.get('kind')!r})")
    return manifest


def read_shard(directory: str | Path, k: int, expected: range) -> dict | None:
    """Shard ``k`` if it is complete and holds exactly the members ``expected`` (else None:
    missing, unreadable, or written for another count, so it must be drawn again)."""
    path = shard_path(directory, k)
    if not path.is_file():
        return None
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn file cannot exist (atomic writes), but a foreign one might
        return None
    if shard.get("indices") is None or shard["indices"].tolist() != list(expected):
        return None
    return shard


class PairSet(Dataset):
    """``(z, x, y)`` items of a complete pair set: z and x (N, D) float32 tokens, y () int64
    (-1 for an unconditional teacher).

    Args:
        directory: the pair set's folder.
        members: which members (default: all ``count`` the manifest... the caller's count).
        count: members the set must hold (shards are checked against it).

    Raises:
        FileNotFoundError: no manifest. ValueError: missing shards (names how many).
    """

    def __init__(self, directory: str | Path, count: int,
                 members: Sequence[int] | None = None) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if self.manifest is None:
            raise FileNotFoundError(f"no pair set in {self.directory} ({MANIFEST} missing)")
        size = int(self.manifest["shard_size"])
        zs, xs, ys, missing = [], [], [], []
        for k in range(num_shards(count, size)):
            shard = read_shard(self.directory, k, shard_members(k, size, count))
            if shard is None:
                missing.append(k)
                continue
            zs.append(shard["z"])
            xs.append(shard["x"])
            ys.append(shard["y"])
        if missing:
            raise ValueError(f"pair set {self.directory} is incomplete: {len(missing)} of "
                             f"{num_shards(count, size)} shards missing (first: {missing[0]}); "
                             f"writing it again resumes where it stopped")
        self.z, self.x, self.y = torch.cat(zs), torch.cat(xs), torch.cat(ys)  # (count, N, D)...
        self.members = list(range(count) if members is None else members)

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.members[i]
        return self.z[m], self.x[m], self.y[m]
