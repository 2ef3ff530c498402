"""``tarflow-encode``: an image dataset -> sharded latents of the model's autoencoder on disk.

Examples::

    tarflow-encode experiment=demo_latent                  # the digits, data/latents/demo
    tarflow-encode experiment=imagenet256_latent data.root=/data/imagenet
    torchrun --nproc-per-node 8 -m tarflow.cli.encode experiment=imagenet256_latent \\
        data.root=/data/imagenet hydra.run.dir=outputs/encode/imagenet256

It composes ``tarflow-train``'s config (``tarflow/conf/encode.yaml`` includes
``train.yaml``), so one ``experiment=`` names the data, the autoencoder
(``model.autoencoder``) and the output directory (``data.latents``) for both commands. Any
``data=`` works (folders, the ImageNet npz files, the
digits); images are read without random flips, and ``encode.flip=true`` stores every train image
in both orientations (the reader picks one at random per access).

Safe to interrupt: shard k (items ``[k * shard_size, (k + 1) * shard_size)`` of a split) is
written to a temporary file and renamed, ``plan.json`` (the draft manifest) fixes what is
being encoded, and ``manifest.json`` is written last, after every shard exists; running the
same command again encodes only the missing shards, and a different configuration aimed at the
same directory is refused. Under ``torchrun`` rank r of W encodes the shards k with
``k % W == r`` (shard files do not depend on W, so a resume may use another world size) and
rank 0 writes the manifest.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from tarflow.app.checks.encode import check_encode_config, claim_out_dir, manifest_draft
from tarflow.app.errors import cli_main, one_line_errors
from tarflow.app.logs import job_log
from tarflow.app.runs import save_records
from tarflow.conf import CONFIG_DIR
from tarflow.data import build_dataset
from tarflow.data.latents import (
    DRAFT,
    MANIFEST,
    read_manifest,
    shard_name,
    write_json,
    write_shard,
)
from tarflow.model.autoencoder import Autoencoder
from tarflow.model.loading import pick_device


def _world() -> tuple[int, int]:
    """(rank, world size) of a torchrun launch, (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _datasets(cfg: DictConfig) -> dict[str, Dataset]:
    """The image datasets of the requested splits, read without random flips."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    shared = dict(data.get("dataset_kwargs") or {})
    out = {}
    for split in cfg.encode.splits:
        extra = {**shared, **(data.get(f"{split}_kwargs") or {})}
        source_split = data.get("val_split", "val") if split == "val" else split
        out[split] = build_dataset(data["name"], root=data.get("root"),
                                   img_size=int(data["img_size"]), split=source_split,
                                   channels=int(data["channels"]), flip=False, **extra)
    return out


def _encode_shards(autoencoder: Autoencoder, ds: Dataset, shards: list[tuple[int, int, int]],
                   *, flip: bool, batch_size: int, num_workers: int, dtype: torch.dtype,
                   device: torch.device) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """``(k, payload)`` for each shard ``(k, start, stop)`` of one split, in order.

    One DataLoader reads all of them (its workers start once, not once per shard); no batch
    spans two shards. A payload holds ``latents`` (n, [2,] c, h, w) in ``dtype`` (the image and
    its mirror with ``flip``), ``stds`` alike for ``encode: sample``, ``labels`` and ``indices``.
    """
    batches = [list(range(a, min(a + batch_size, stop)))
               for _, start, stop in shards for a in range(start, stop, batch_size)]
    loader = iter(DataLoader(ds, batch_sampler=batches, num_workers=num_workers))
    sample = autoencoder.record.encode == "sample"
    for k, start, stop in shards:
        means, stds, labels, seen = [], [], [], 0
        while seen < stop - start:
            x, y = next(loader)
            x = x.to(device)
            views = [x, x.flip(-1)] if flip else [x]  # the image and its mirror
            pairs = [autoencoder.posterior(v) for v in views]
            means.append(torch.stack([m for m, _ in pairs], 1) if flip else pairs[0][0])
            stds.append(torch.stack([s for _, s in pairs], 1) if flip else pairs[0][1])
            labels.append(torch.as_tensor(y, dtype=torch.long).reshape(-1))
            seen += x.shape[0]
        payload = {"latents": torch.cat(means).to("cpu", dtype), "labels": torch.cat(labels),
                   "indices": torch.arange(start, stop, dtype=torch.long)}
        if sample:  # drawn at read time, a new draw per epoch
            payload["stds"] = torch.cat(stds).to("cpu", dtype)
        yield k, payload


def _agree(failed: bool) -> None:
    """Raise on every rank when any rank failed (after a barrier-like all-reduce)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([float(failed)])
        dist.all_reduce(flag)
        if float(flag) and not failed:
            raise RuntimeError("another rank failed while encoding; its traceback shows why")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Encode as configured; returns the manifest (also written to ``manifest.json``)."""
    import torch.distributed as dist

    record = check_encode_config(cfg)
    datasets = _datasets(cfg)  # a wrong data.root fails here, before anything is written
    draft = manifest_draft(cfg, record, datasets)
    out = Path(str(cfg.encode.out_dir)).expanduser()
    rank, world = _world()
    if claim_out_dir(out, draft):
        print(f"{out} already holds these latents ({MANIFEST} is complete); nothing to do")
        return read_manifest(out)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if rank == 0:
        save_records(cfg)
        write_json(out / DRAFT, draft)
    device = pick_device(cfg.encode.get("device"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    t0, done = time.perf_counter(), 0
    try:
        autoencoder = Autoencoder.load(record, device=device)
        dtype = getattr(torch, str(cfg.encode.storage_dtype))
        size = int(cfg.encode.shard_size)
        todo = [(split, k) for split, info in draft["splits"].items()
                for k in range(len(info["shards"])) if k % world == rank
                and not (out / shard_name(split, k)).is_file()]  # finished shards stay
        bar = _progress(len(todo), draft, bool(cfg.encode.progress) and rank == 0)
        for split, info in draft["splits"].items():
            mine = [(k, k * size, k * size + info["shards"][k]["count"])
                    for s, k in todo if s == split]
            for k, payload in _encode_shards(
                    autoencoder, datasets[split], mine, flip=bool(cfg.encode.flip)
                    and split == "train", batch_size=int(cfg.encode.batch_size),
                    num_workers=int(cfg.encode.num_workers), dtype=dtype, device=device):
                write_shard(out / shard_name(split, k), payload)
                done += len(payload["indices"])
                bar.update()
        bar.close()
        if world > 1:
            print(f"rank {rank}/{world} encoded shards "
                  f"{', '.join(f'{s}:{k}' for s, k in todo) or 'none'}", flush=True)
    except BaseException:
        _agree(True)
        raise
    _agree(False)
    # Every rank looks (they share the directory), so all raise together or none does.
    missing = [s["file"] for info in draft["splits"].values() for s in info["shards"]
               if not (out / s["file"]).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) missing after encoding, e.g. "
                           f"{missing[0]}; run the command again")
    if rank == 0:
        write_json(out / MANIFEST, {**draft, "complete": True})
        counts = ", ".join(f"{s} {info['count']}" for s, info in draft["splits"].items())
        print(f"encoded {counts} images into {draft['latent_shape']} latents "
              f"(flips: {draft['flip']}, stored as {draft['storage_dtype']}) in {out}; this run "
              f"encoded {done} in {time.perf_counter() - t0:.1f} s; manifest {out / MANIFEST}")
    if world > 1 and dist.is_initialized():
        dist.barrier()  # nobody reads the manifest before rank 0 wrote it
        dist.destroy_process_group()
    return {**draft, "complete": True}


def _progress(total: int, draft: dict[str, Any], enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="encoding shards", unit="shard", disable=not enabled,
                postfix={"images per shard": draft["shard_size"]})


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="encode")
def _hydra_main(cfg: DictConfig) -> None:
    with one_line_errors(), job_log():
        run(cfg)


def main() -> None:
    """Console entry point (user errors: one ``error: ...`` line, exit status 2)."""
    cli_main(_hydra_main)


if __name__ == "__main__":
    main()
