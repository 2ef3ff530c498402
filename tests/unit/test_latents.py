"""The encoded-latents format: manifest guards, the reader and its randomness (ring 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tarflow.data import DataError
from tarflow.data.latents import (
    DRAFT,
    FORMAT,
    MANIFEST,
    LatentDataset,
    check_manifest,
    read_manifest,
    shard_name,
    write_json,
    write_shard,
)

AE = {"fingerprint": "abc", "scaling_factor": 0.5, "shift_factor": 0.0, "encode": "mean",
      "latent_channels": 4, "downsample": 2}
SOURCE = {"name": "fake", "img_size": 8, "channels": 1, "num_classes": 3}


def write_latents(root: Path, counts: dict[str, list[int]], *, both: bool = False,
                  stds: bool = False, complete: bool = True) -> dict:
    """A directory as tarflow-encode leaves it: shards of random latents, plan and manifest."""
    gen = torch.Generator().manual_seed(0)
    splits = {}
    for split, sizes in counts.items():
        shards, start = [], 0
        for k, n in enumerate(sizes):
            shape = (n, 2, 4, 4, 4) if both else (n, 4, 4, 4)
            payload = {"latents": torch.randn(shape, generator=gen).half(),
                       "labels": torch.arange(start, start + n) % 3,
                       "indices": torch.arange(start, start + n)}
            if stds:
                payload["stds"] = torch.full(shape, 0.5).half()
            write_shard(root / shard_name(split, k), payload)
            shards.append({"file": shard_name(split, k), "count": n})
            start += n
        splits[split] = {"count": start, "shards": shards}
    plan = {"format": FORMAT, "autoencoder": {**AE, "path": "/ae"}, "source": SOURCE,
            "latent_shape": [4, 4, 4], "storage_dtype": "float16",
            "flip": "both" if both else "none", "shard_size": max(max(v) for v in counts.values()),
            "splits": splits}
    write_json(root / DRAFT, plan)
    if complete:
        write_json(root / MANIFEST, {**plan, "complete": True})
    return plan


def test_reads_every_item_across_shards(tmp_path: Path) -> None:
    write_latents(tmp_path, {"train": [4, 4, 2], "val": [3]})
    ds = LatentDataset(tmp_path, "train")
    assert len(ds) == 10 and (ds.channels, ds.img_size, ds.num_classes) == (4, 4, 3)
    shard = torch.load(tmp_path / shard_name("train", 1), weights_only=True)
    z, y = ds[5]  # item 1 of shard 1
    assert z.dtype == torch.float32 and z.shape == (4, 4, 4) and int(y) == 5 % 3
    torch.testing.assert_close(z, shard["latents"][1].float())
    with pytest.raises(IndexError):
        ds[10]
    assert len(LatentDataset(tmp_path, "val")) == 3
    with pytest.raises(DataError, match="holds the splits"):
        LatentDataset(tmp_path, "test")


def test_both_orientations_and_posterior_draws(tmp_path: Path) -> None:
    write_latents(tmp_path, {"train": [6]}, both=True, stds=True)
    shard = torch.load(tmp_path / shard_name("train", 0), weights_only=True)
    fixed = LatentDataset(tmp_path, "train", flip=True, random=False)  # validation reads
    torch.testing.assert_close(fixed[2][0], shard["latents"][2, 0].float())
    torch.manual_seed(0)
    drawn = LatentDataset(tmp_path, "train", flip=True)
    picks = set()
    for _ in range(40):
        z = drawn[2][0]
        # Nearest stored orientation; the posterior draw (std 0.5) moves it off both.
        dist = [(z - shard["latents"][2, o].float()).abs().mean() for o in (0, 1)]
        picks.add(int(torch.tensor(dist).argmin()))
        assert min(dist) > 0.1
    assert picks == {0, 1}
    unflipped = LatentDataset(tmp_path, "train", flip=False)
    for _ in range(10):
        z = unflipped[2][0]
        assert (z - shard["latents"][2, 0].float()).abs().mean() < (
            z - shard["latents"][2, 1].float()).abs().mean()


def test_unfinished_or_foreign_directories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist; encode the data first"):
        read_manifest(tmp_path / "none")
    write_latents(tmp_path / "half", {"train": [2]}, complete=False)
    with pytest.raises(DataError, match="interrupted; run the same tarflow-encode command"):
        LatentDataset(tmp_path / "half", "train")
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="not written by tarflow-encode"):
        read_manifest(tmp_path / "other")


def test_manifest_guard_names_every_difference(tmp_path: Path) -> None:
    manifest = write_latents(tmp_path, {"train": [2]})
    check_manifest(manifest, autoencoder=AE, source=SOURCE, where="x")  # the same: accepted
    with pytest.raises(DataError) as err:
        check_manifest(manifest, autoencoder={**AE, "fingerprint": "def", "scaling_factor": 1.0},
                       source={**SOURCE, "img_size": 16}, where=str(tmp_path))
    message = str(err.value)
    assert "autoencoder fingerprint=abc (configured: def)" in message
    assert "scaling_factor=0.5 (configured: 1.0)" in message
    assert "data.img_size=8 (configured: 16)" in message and "re-encode" in message


def test_shards_are_written_whole_or_not_at_all(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / shard_name("train", 0)

    def crash(obj, handle):
        handle.write(b"half a shard")
        raise KeyboardInterrupt  # an interruption in the middle of the write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        write_shard(path, {"latents": torch.zeros(1)})
    assert not path.exists() and not list(path.parent.glob("*"))  # no partial file is left
    monkeypatch.undo()
    write_shard(path, {"latents": torch.ones(2)})
    assert torch.load(path, weights_only=True)["latents"].tolist() == [1.0, 1.0]
