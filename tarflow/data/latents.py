"""Pre-encoded latents on disk: the layout ``tarflow-encode`` writes and :class:`LatentDataset`
reads.

Layout of an encoded directory::

    plan.json             what is being encoded (written first; a resume must match it)
    manifest.json         the same plus "complete": true, written last, once every shard exists
    train/shard-00000.pt  shard k holds source items [k * shard_size, (k + 1) * shard_size)
    val/shard-00000.pt

A shard is a ``torch.save`` dict: ``latents`` (n, c, h, w), or (n, 2, c, h, w) when both
orientations were encoded (the image and its mirror), in the manifest's storage dtype; ``stds``
alike when the posterior is sampled at read time (``encode: sample``); ``labels`` (n,) and
``indices`` (n,) (positions in the source split). Shards are written to a temporary file and
renamed, so a shard either exists whole or not at all: an interrupted encoding resumes with the
missing shards, and nothing is read before ``manifest.json`` exists.

The manifest records the autoencoder (:class:`~tarflow.model.autoencoder.AutoencoderRecord`),
the source data (name, root, resolution, channels, classes, options), the latent shape, the flip
handling and the per-split counts; :func:`check_manifest` refuses latents made otherwise than
a run is configured for.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from tarflow.data.errors import DataError
from tarflow.files import atomic_torch_save, atomic_write

FORMAT = "tarflow-latents/1"
MANIFEST = "manifest.json"
DRAFT = "plan.json"
FLIPS = ("none", "both")
STORAGE_DTYPES = ("float16", "bfloat16", "float32")
# Source facts a run's data config must share with the latents it reads.
SOURCE_KEYS = ("name", "img_size", "channels", "num_classes")


def shard_name(split: str, k: int) -> str:
    return f"{split}/shard-{k:05d}.pt"


def shard_count(count: int, shard_size: int) -> int:
    return -(-int(count) // int(shard_size))


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True))


def write_shard(path: Path, payload: dict[str, torch.Tensor]) -> None:
    """Atomically write one shard (temporary file in the same directory, then rename)."""
    atomic_torch_save(payload, path)


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a finished encoding.

    Raises:
        DataError: no directory, an unfinished encoding, or an unreadable manifest.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"latents directory {root} does not exist; encode the data first with "
                        f"`tarflow-encode experiment=<your latent experiment>` (it writes "
                        f"data.latents), or set data.latents=null to encode on the fly")
    path = root / MANIFEST
    if not path.is_file():
        started = (root / DRAFT).is_file()
        raise DataError(
            f"{root} has no {MANIFEST}: "
            + ("its encoding was interrupted; run the same tarflow-encode command again to "
               "finish it" if started else "it was not written by tarflow-encode"))
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not readable JSON ({err}); re-run tarflow-encode") from None
    if manifest.get("format") != FORMAT or not manifest.get("complete"):
        raise DataError(f"{path} is not a complete {FORMAT} manifest; re-run tarflow-encode")
    return manifest


def check_manifest(manifest: Mapping[str, Any], *, autoencoder: Mapping[str, Any] | None,
                   source: Mapping[str, Any] | None, where: str) -> None:
    """Refuse latents that were not made with this autoencoder from this data.

    Args:
        manifest: from :func:`read_manifest`.
        autoencoder: the configured autoencoder's ``AutoencoderRecord.identity()``.
        source: the configured data's ``name``, ``img_size``, ``channels``, ``num_classes``.
        where: the directory, for the message.
    """
    problems = []
    theirs = manifest.get("autoencoder") or {}
    for key, ours in (autoencoder or {}).items():
        if theirs.get(key) != ours:
            problems.append(f"autoencoder {key}={theirs.get(key)} (configured: {ours})")
    recorded = manifest.get("source") or {}
    for key in SOURCE_KEYS:
        if source is not None and key in source and recorded.get(key) != source[key]:
            problems.append(f"data.{key}={recorded.get(key)} (configured: {source[key]})")
    if problems:
        raise DataError(
            f"the latents in {where} do not match this run: {'; '.join(problems)}. They were "
            f"encoded with the autoencoder {theirs.get('path')}; re-encode with tarflow-encode "
            f"for this configuration (into another data.latents), or configure the autoencoder "
            f"and data they were made with")


class LatentDataset(Dataset):
    """One split of an encoded directory as ``(latent (c, h, w) float32, label int64)`` pairs.

    Shards are memory-mapped on first use, so a dataset far larger than memory can be read.
    Training-time randomness, drawn from the global generator like torchvision's own flip:
    with both orientations stored and ``flip`` on, each access takes one of the two at random;
    with stored standard deviations (``encode: sample``), each access draws from the posterior.
    ``random=False`` (validation) always reads the image's own orientation and the posterior mean.

    Attributes:
        manifest: the directory's manifest.
        name, num_classes: the source dataset's.
        img_size, channels: the latents' side and channels (what the flow models).
    """

    def __init__(self, root: str | Path, split: str, *, flip: bool = False,
                 random: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.manifest = read_manifest(self.root)
        splits = self.manifest.get("splits") or {}
        if split not in splits:
            raise DataError(f"{self.root} holds the splits {sorted(splits)}, not {split!r}; "
                            f"encode it with tarflow-encode encode.splits=[...]")
        source = self.manifest["source"]
        self.name, self.num_classes = source["name"], int(source["num_classes"])
        self.channels, self.img_size = int(self.manifest["latent_shape"][0]), int(
            self.manifest["latent_shape"][1])
        self.split = split
        self.flip, self.random = bool(flip), bool(random)
        self.files = [self.root / s["file"] for s in splits[split]["shards"]]
        counts = [int(s["count"]) for s in splits[split]["shards"]]
        self.offsets = [0]
        for n in counts:
            self.offsets.append(self.offsets[-1] + n)
        self._shards: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def _shard(self, k: int) -> dict[str, torch.Tensor]:
        if k not in self._shards:
            try:
                self._shards[k] = torch.load(self.files[k], map_location="cpu", mmap=True,
                                             weights_only=True)
            except Exception as err:  # deleted or damaged after the manifest was written
                raise DataError(f"latent shard {self.files[k]} is unreadable ({err}); re-run "
                                f"tarflow-encode on a fresh directory") from None
        return self._shards[k]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} latents")
        k = bisect.bisect_right(self.offsets, index) - 1
        shard, j = self._shard(k), index - self.offsets[k]
        latent = shard["latents"][j]
        std = shard["stds"][j] if "stds" in shard else None
        if latent.ndim == 4:  # (2, c, h, w): the image and its mirror
            o = int(torch.randint(2, ())) if self.flip and self.random else 0
            latent = latent[o]
            std = None if std is None else std[o]
        latent = latent.float()
        if std is not None and self.random:
            latent = latent + std.float() * torch.randn(latent.shape)
        return latent, shard["labels"][j].clone()

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers and spawned ranks map the files themselves.
        return {**self.__dict__, "_shards": {}}
