"""Start-up checks of ``tarflow-encode``: the settings, and an output folder that holds latents of
another configuration, refused before any image is read.

The *draft* is the manifest this run will write, less the word that it is complete; it is saved
first (as ``plan.json``, the on-disk name older runs used) so a resume can prove it encodes the
same thing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from tarflow.data.latents import (
    DRAFT,
    FORMAT,
    MANIFEST,
    STORAGE_DTYPES,
    read_manifest,
    shard_count,
    shard_name,
)
from tarflow.model.autoencoder import AutoencoderRecord, resolve_autoencoder

SPLITS = ("train", "val")


def check_encode_config(cfg: DictConfig) -> AutoencoderRecord:
    """Refuse settings that cannot work before any image is read (one line each)."""
    spec = cfg.model.get("autoencoder")
    if not spec:
        raise ValueError("model.autoencoder is not set: choose a latent experiment, e.g. "
                         "tarflow-encode experiment=demo_latent")
    enc = cfg.encode
    if not enc.get("out_dir"):
        raise ValueError("encode.out_dir is not set (it defaults to data.latents)")
    bad = sorted(set(enc.splits) - set(SPLITS))
    if bad or not enc.splits:
        raise ValueError(f"encode.splits={list(enc.splits)} must name some of {list(SPLITS)}")
    for key in ("shard_size", "batch_size"):
        if int(enc[key]) < 1:
            raise ValueError(f"encode.{key}={enc[key]} must be >= 1")
    if str(enc.storage_dtype) not in STORAGE_DTYPES:
        raise ValueError(f"encode.storage_dtype={enc.storage_dtype} must be one of "
                         f"{STORAGE_DTYPES}")
    record = resolve_autoencoder(OmegaConf.to_container(spec, resolve=True))
    if int(cfg.data.img_size) % record.downsample:
        raise ValueError(f"data.img_size={cfg.data.img_size} is not divisible by the "
                         f"autoencoder's downsampling {record.downsample}")
    if int(cfg.data.channels) != record.image_channels:
        raise ValueError(f"data.channels={cfg.data.channels} but the autoencoder takes "
                         f"{record.image_channels}-channel images")
    return record


def manifest_draft(cfg: DictConfig, record: AutoencoderRecord,
              datasets: dict[str, Dataset]) -> dict[str, Any]:
    """What this command encodes: the manifest, less the word that it is complete."""
    data, enc = OmegaConf.to_container(cfg.data, resolve=True), cfg.encode
    size = int(enc.shard_size)
    side = int(data["img_size"]) // record.downsample
    splits = {}
    for split, ds in datasets.items():
        n = len(ds)
        splits[split] = {"count": n, "shards": [
            {"file": shard_name(split, k), "count": min(size, n - k * size)}
            for k in range(shard_count(n, size))]}
    return {
        "format": FORMAT,
        "autoencoder": record.to_dict(),
        "source": {"name": str(data["name"]), "root": None if data.get("root") is None
                   else str(Path(str(data["root"])).expanduser().resolve()),
                   "img_size": int(data["img_size"]), "channels": int(data["channels"]),
                   "num_classes": int(data["num_classes"]),
                   "dataset_kwargs": dict(data.get("dataset_kwargs") or {})},
        "latent_shape": [record.latent_channels, side, side],
        "storage_dtype": str(enc.storage_dtype),
        "flip": "both" if enc.flip else "none",
        "shard_size": size,
        "splits": splits,
    }


def comparable(draft: dict[str, Any]) -> dict[str, Any]:
    """A draft without what may change between an interrupted run and its resume (the
    autoencoder's location and chunk size, the data's location)."""
    ae = AutoencoderRecord.from_dict(draft["autoencoder"])
    source = {k: v for k, v in draft["source"].items() if k != "root"}
    rest = {k: v for k, v in draft.items() if k not in ("autoencoder", "source", "complete")}
    return {**rest, "source": source, "autoencoder": {**ae.identity(), "dtype": ae.dtype}}


def claim_out_dir(out: Path, draft: dict[str, Any]) -> bool:
    """Compare with what the directory already holds; True when it is complete already."""
    for name in (MANIFEST, DRAFT):
        path = out / name
        if not path.is_file():
            continue
        theirs = read_manifest(out) if name == MANIFEST else json.loads(path.read_text())
        if comparable(theirs) != comparable(draft):
            differ = sorted(k for k, v in comparable(draft).items()
                            if comparable(theirs).get(k) != v)
            raise ValueError(f"encode.out_dir {out} holds latents of another configuration "
                             f"(differs in {', '.join(differ)}); choose another encode.out_dir "
                             f"(data.latents) or delete that directory")
        if name == MANIFEST:
            return True
    return False
