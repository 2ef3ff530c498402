"""Drawing a fixed sample set on every rank of a launch into shards, and assembling it on rank 0.

The pieces ``tarflow-sample`` runs in order (``tarflow-eval`` can call the same ones): every
rank agrees on one output folder (:func:`shared_out_dir`), rank 0 decides what others follow
(:func:`on_main`: a plan, the shards still missing), each rank draws its shards
(:func:`draw_missing`), and rank 0 assembles the set once all are written (:func:`finish_set`).
A failure on any rank ends every rank (:func:`together`), so none waits forever in a
collective. Files: :mod:`tarflow.app.sample_shards`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from tarflow.app import distributed
from tarflow.app.distributed import World
from tarflow.app.errors import EXIT_USAGE, USER_ERRORS
from tarflow.app.sample_outputs import GRID, NPZ, png_path
from tarflow.app.sample_shards import SampleFolder, deal, missing_shards, save_adm_npz
from tarflow.eval import images_to_uint8
from tarflow.eval.fid_at_n import draw_set
from tarflow.eval.plots import image_grid
from tarflow.model.space import PixelSpace
from tarflow.model.tarflow import TarFlow
from tarflow.sampling.sample_set import IterationTally, Label, SampledBatch
from tarflow.sampling.schedule import SamplingSchedule

log = logging.getLogger(__name__)
T = TypeVar("T")
EXIT_FAILURE = 1


def on_main(world: World, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only; its result (small, picklable) on every rank. When it raises,
    rank 0 raises it and the other ranks exit quietly with the matching status (2 for a user
    error, whose one line rank 0 prints; 1 otherwise)."""
    result, error = None, None
    if world.is_main:
        try:
            result = fn()
        except Exception as err:  # every rank must hear of it before rank 0 reports it
            error = err
    status = None if error is None else EXIT_USAGE if isinstance(error, USER_ERRORS) \
        else EXIT_FAILURE
    result, status = distributed.broadcast((result, status))
    if error is not None:
        raise error
    if status is not None:
        raise SystemExit(status)
    return result


def together(world: World, fn: Callable[[], T]) -> T:
    """``fn()`` on every rank; if it fails on any rank, every rank stops. The failure is
    reported once: by rank 0 when it failed (the others, which mostly failed alike, exit
    quietly), else by the ranks that failed."""
    error = None
    try:
        result = fn()
    except Exception as err:
        error, result = err, None
    if distributed.any_failed(error is not None):
        main_failed = distributed.broadcast(error is not None)
        if error is not None and (world.is_main or not main_failed):
            raise error
        raise SystemExit(EXIT_USAGE if isinstance(error, USER_ERRORS) else EXIT_FAILURE)
    return result


def shared_out_dir(world: World, own: str) -> str:
    """Rank 0's output folder, on every rank. A secondary rank's own Hydra run dir (its
    ``${now:...}`` may be a second later) is removed again while empty, and its log file
    handlers are closed: only rank 0 writes records, logs and summaries."""
    shared = str(distributed.broadcast(own))
    if not world.is_main:
        from tarflow.app.runs import remove_new_run_dir

        loggers = [logging.getLogger(), *(logging.getLogger(name)
                                          for name in list(logging.Logger.manager.loggerDict))]
        for logger in loggers:
            for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
                logger.removeHandler(handler)
                handler.close()
        if Path(own).resolve() != Path(shared).resolve():
            remove_new_run_dir()
    return shared


def _keep_uint8(images: list[np.ndarray], labels: list[np.ndarray],
                channels: int) -> Callable[[SampledBatch, torch.Tensor], None]:
    """An ``on_batch`` that keeps each batch as (B, H, W, C) uint8 and its labels (zeros for an
    unconditional model)."""

    def keep(b: SampledBatch, decoded: torch.Tensor) -> None:
        uint8 = images_to_uint8(decoded.cpu())[:, :channels]  # (B, C, H, W)
        images.append(uint8.permute(0, 2, 3, 1).numpy())
        labels.append(b.labels.cpu().numpy() if b.labels is not None
                      else np.zeros(len(b.indices), np.int64))

    return keep


def draw_missing(net: TarFlow, folder: SampleFolder, schedule: SamplingSchedule, *,
                 world: World, total: int, shard_size: int, seed: int, batch_size: int,
                 knobs: dict | None = None, space: PixelSpace | None = None,
                 label: Label = None, progress: bool = False) -> tuple[int, int]:
    """Draw the members of ``0..total-1`` that no finished shard in ``folder`` holds, this
    rank's share of them, writing one shard file at a time.

    Rank 0 lists the missing shards (:func:`~tarflow.app.sample_shards.missing_shards`) and
    every rank takes its share of that list (:func:`~tarflow.app.sample_shards.deal`).

    Returns:
        ``(members missing before this job, members this rank drew)``.
    """
    todo = on_main(world, lambda: missing_shards(total, folder.done(), shard_size))
    mine = deal(todo, world.rank, world.size)
    space = space or PixelSpace(net.config)
    drawn = 0
    for first, last in mine:
        images: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        run = draw_set(net, range(first, last + 1), schedule, seed=seed,
                         batch_size=batch_size, knobs=knobs, space=space, label=label,
                         on_batch=_keep_uint8(images, labels, space.image_shape[0]),
                         progress=progress and world.is_main, desc=f"members {first}..{last}")
        tally = torch.cat([run.tally.to_tensor(), torch.tensor([run.decode_seconds],
                                                               dtype=torch.float64)])
        folder.write_shard(range(first, last + 1), np.concatenate(images),
                           np.concatenate(labels), tally.numpy())
        drawn += last + 1 - first
    return sum(b + 1 - a for a, b in todo), drawn


def finish_set(folder: SampleFolder, total: int, *, fmt: str, grid_size: int = 0,
               grid_nrow: int | None = None) -> dict[str, Any]:
    """Rank 0, once every shard is written: ``samples.npz`` in the ADM layout
    (:func:`~tarflow.app.sample_shards.save_adm_npz`; ``fmt`` npz or both), ``samples/<i>.png``
    (png or both) and ``grid.png`` of the first ``grid_size`` members.

    Returns:
        ``tally`` (the sampler's cost summed over every shard, an
        :class:`~tarflow.sampling.sample_set.IterationTally`), ``decode_seconds`` and the
        written ``npz`` / ``grid`` paths.
    """
    out = folder.root
    whole = folder.assemble(total)
    info: dict[str, Any] = {"tally": IterationTally.from_tensor(torch.from_numpy(whole.tally[:-1])),
                            "decode_seconds": float(whole.tally[-1])}
    if fmt != "png":
        info["npz"] = str(save_adm_npz(out / NPZ, whole.images, whole.labels, whole.indices))
    if fmt != "npz":
        (out / "samples").mkdir(exist_ok=True)
        for i, img in zip(whole.indices, whole.images, strict=True):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(png_path(out, i))
    if grid_size > 0:
        first = torch.from_numpy(whole.images[:grid_size]).permute(0, 3, 1, 2).float()
        image_grid(first / 127.5 - 1.0, grid_nrow).save(out / GRID)
        info["grid"] = str(out / GRID)
    return info
