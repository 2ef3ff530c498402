"""``tarflow-sample``: a checkpoint -> N images (PNG files and/or one NPZ), any sampler.

Examples::

    tarflow-sample ckpt_path=outputs/demo/<time>/checkpoints/last.ckpt
    tarflow-sample ckpt_path=... sampler=gs_jacobi_auto probe.dataset=demo num_samples=1000
    tarflow-sample ckpt_path=... sampler=gs_jacobi sampler.schedule="'[3-8-16-10]'" format=npz
    tarflow-sample ckpt_path=... sampler.guidance=2.0 label=7

Sample ``i`` starts from seed ``seed + i`` (noise, then its label), exactly as in validation, so
``num_samples=100`` reproduces the validation FID set. Outputs go to ``out_dir`` (the Hydra run dir
by default): ``samples/<i>.png`` (PNG), ``samples.npz`` with ``arr_0`` (N, H, W, C) uint8 (the
layout common FID tools read), ``labels`` and ``indices`` (NPZ), ``grid.png`` and
``sample_summary.json`` (timing, iterations per block, schedule, and what defines the set).

Latent models (a checkpoint that records an autoencoder) are sampled in latent space and decoded
to images transparently, in chunks; the timing covers the sampler only, and the summary gives the
decoding time separately. ``autoencoder_path=`` points at a copy of the recorded autoencoder on a
machine where its recorded path does not exist (its weights fingerprint must match).

Before any work :func:`~tarflow.app.checks.sample.check_sample_config` checks the config against
the checkpoint and the output folder: a folder that already holds samples is refused unless
``if_exists=overwrite`` (its sample files are deleted first) or ``if_exists=append`` with
``first_index`` (another range of the same set; :mod:`tarflow.app.sample_outputs`). What is
printed also goes to ``sample.log``.

:func:`run` is the testable core; :func:`main` is the ``@hydra.main`` wrapper.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from tarflow.app.checks.sample import check_sample_config, sample_job
from tarflow.app.config_types import check_job_types
from tarflow.app.errors import cli_main, one_line_errors
from tarflow.app.logs import job_log
from tarflow.app.runs import save_records
from tarflow.app.sample_outputs import SampleFiles, clear_outputs
from tarflow.conf import CONFIG_DIR
from tarflow.data.subsets import fixed_subset, stack_items
from tarflow.eval import images_to_uint8
from tarflow.eval.plots import image_grid
from tarflow.model import CheckpointSummary, TarFlow
from tarflow.model.space import PixelSpace, make_space
from tarflow.sampling import Plan, PlanCache, SamplingSchedule, rank_blocks, ranking_table, sample
from tarflow.sampling.plan import device_name
from tarflow.sampling.sample_set import IterationTally, fixed_inputs, sample_batches
from tarflow.sampling.settings import SamplerSettings, parse_sampler

log = logging.getLogger(__name__)


def pick_device(name: str | None) -> torch.device:
    """``auto`` (or None) means the GPU when there is one."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_network(ckpt_path: str, device: str | None = "auto",
                 dtype: str = "float32") -> TarFlow:
    """A TarFlow from any supported checkpoint, in eval mode on ``device`` / ``dtype``."""
    if not ckpt_path:
        raise ValueError("ckpt_path is required: ckpt_path=<run dir>/checkpoints/last.ckpt")
    net = TarFlow.from_checkpoint(ckpt_path, map_location="cpu")
    return net.to(device=pick_device(device), dtype=getattr(torch, dtype)).eval()


def load_space(summary: CheckpointSummary, net: TarFlow,
               autoencoder_path: str | None = None) -> PixelSpace:
    """The checkpoint's space: pixels, or its recorded autoencoder (``autoencoder_path``: a
    copy of it elsewhere), to decode samples and encode probe images."""
    return make_space(net.config, summary.autoencoder, path=autoencoder_path or None)


def probe_batch(net: TarFlow, probe: dict[str, Any],
                space: PixelSpace | None = None) -> tuple[torch.Tensor, str]:
    """(M, C, H, W) flow inputs for the CRM/IGM ranking and where they came from.

    ``probe.dataset`` names a dataset (real images, as the paper does; a latent model's
    ``space`` encodes them); null falls back to the model's own sequential samples (slower,
    and only as good as the model).
    """
    space = space or PixelSpace(net.config)
    size = int(probe.get("size") or 256)
    param = next(net.parameters())
    if probe.get("dataset"):
        from tarflow.data import build_dataset

        channels, side, _ = space.image_shape
        ds = build_dataset(probe["dataset"], root=probe.get("root"), img_size=side,
                           split=probe.get("split") or "train", channels=channels,
                           flip=False, **(probe.get("dataset_kwargs") or {}))
        images = stack_items(ds, fixed_subset(ds, size, int(probe.get("seed") or 0)))[0]
        images = space.flow_inputs(images.to(param.device))
        return images.to(param.device, param.dtype), f"{images.shape[0]} {probe['dataset']} images"
    noise, y = fixed_inputs(net, range(size), int(probe.get("seed") or 0))
    images, _ = sample(net, noise, y)
    return images, f"{size} sequential samples of the model (probe.dataset is null)"


def resolve_schedule(settings: SamplerSettings, net: TarFlow, probe: dict[str, Any], *,
                     batch_size: int, plan_cache: str | None = None,
                     space: PixelSpace | None = None) -> tuple[SamplingSchedule, Plan | None]:
    """The sampler's schedule and, for ``schedule: auto``, the plan behind it (printed).

    A plan cached for these weights, device, batch and settings is reused without ranking;
    otherwise the blocks are ranked on a probe batch (the planner's prior) and the planner
    measures the candidates at ``batch_size``.
    """
    if not settings.is_auto:
        return settings.resolve(None, net.config.num_patches), None
    cache = PlanCache(plan_cache) if plan_cache else None
    plan = cache.get(settings.plan_key(net, batch_size)) if settings.is_planned and cache else None
    where = "cached plan"
    if plan is None:
        images, where = probe_batch(net, probe, space)
        ranking = rank_blocks(net, images)
        schedule, plan = settings.schedule_for(net, ranking, batch_size, cache=cache)
        log.info("CRM/IGM ranking on %s:\n%s", where, ranking_table(ranking, schedule))
        if plan is None:
            print(f"automatic schedule ({settings.schedule}, ranked on {where}): "
                  f"{schedule.describe()}")
    if plan is not None:
        device = device_name(next(net.parameters()).device)
        print(f"sampling plan at batch {batch_size} on {device} (prior: {where}"
              f"{'' if cache is None else f'; cache {cache.path}'}):\n{plan.table()}")
    return (plan.schedule if plan is not None else schedule), plan


def summary_of(settings: SamplerSettings, schedule: SamplingSchedule,
               tally: IterationTally, plan: Plan | None = None) -> dict[str, Any]:
    """JSON-ready timing and iteration numbers of a sampling run (and its plan, if planned:
    the measured speed-up compares the run's seconds per batch with the sequential loop's as
    the planner timed it at the same batch size)."""
    extra = {}
    if plan is not None and tally.batches:
        extra = {"plan": plan.to_dict(),
                 "speedup_vs_planned_sequential": plan.sequential_seconds
                 / max(tally.seconds / tally.batches, 1e-12)}
    return {
        "sampler": settings.name,
        "schedule": schedule.describe(),
        "knobs": settings.knobs,
        "num_samples": tally.images,
        "seconds": tally.seconds,
        "seconds_per_image": tally.seconds_per_image,
        "iters_per_block": {str(b): n for b, n in tally.mean_iters().items()},
        "fallback": tally.fallback,
        **extra,
    }


def progress_bar(iterable, total: int, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Sample ``cfg.num_samples`` images and write them; returns the summary dict (plus
    ``out_dir``, and the written ``npz`` / ``grid`` paths)."""
    checked = check_sample_config(cfg)
    fmt = str(cfg.get("format", "png"))
    save_records(cfg)
    settings = parse_sampler(OmegaConf.to_container(cfg.sampler, resolve=True))
    net = load_network(cfg.ckpt_path, cfg.get("device"), cfg.get("dtype", "float32"))
    space = load_space(checked, net, cfg.get("autoencoder_path")).to(next(net.parameters()).device)
    probe = OmegaConf.to_container(cfg.get("probe") or {}, resolve=True)
    n, batch = int(cfg.num_samples), int(cfg.batch_size)
    first = int(cfg.get("first_index", 0))
    schedule, plan = resolve_schedule(settings, net, probe, batch_size=min(batch, n),
                                      plan_cache=cfg.paths.get("plan_cache"), space=space)
    out = Path(cfg.out_dir)
    files = SampleFiles(out, first, n)
    if str(cfg.get("if_exists", "refuse")) == "overwrite" and out.is_dir():
        removed = clear_outputs(out)
        if removed:
            log.info("if_exists=overwrite: removed %d earlier sample file(s) from %s", removed, out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt != "npz":
        (out / "samples").mkdir(exist_ok=True)
    label = cfg.get("label")
    tally = IterationTally(net.config.num_blocks)
    pixels, labels, grid_images = [], [], []
    decode_seconds = 0.0
    batches = sample_batches(net, range(first, first + n), schedule, seed=int(cfg.seed),
                             batch_size=batch, knobs=settings.knobs,
                             label=None if label is None else int(label))
    for b in progress_bar(batches, math.ceil(n / batch), bool(cfg.get("progress", True)),
                          "sampling"):
        tally.add(b)
        t0 = time.perf_counter()
        images = space.decode(b.images).float().cpu()  # latent models: decoded, in chunks
        decode_seconds += time.perf_counter() - t0
        uint8 = images_to_uint8(images)[:, : space.image_shape[0]]
        hwc = uint8.permute(0, 2, 3, 1).numpy()  # (B, C, H, W) -> (B, H, W, C)
        if fmt != "npz":
            for i, img in zip(b.indices, hwc, strict=True):
                Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(files.png(i))
        if fmt != "png":
            pixels.append(hwc)
            labels.append(b.labels.cpu().numpy() if b.labels is not None
                          else np.zeros(len(b.indices), np.int64))
        if sum(x.shape[0] for x in grid_images) < int(cfg.get("grid_size", 64)):
            grid_images.append(images)
    result = summary_of(settings, schedule, tally, plan)
    if space.latent:
        result["decode_seconds"] = decode_seconds  # not in "seconds", which times the sampler
        result["autoencoder"] = space.record.to_dict()
    result["job"] = sample_job(cfg, checked.path)  # an append (if_exists=append) must match
    result["indices"] = [first, first + n - 1]
    result["out_dir"] = str(out)
    if fmt != "png":
        result["npz"] = str(files.npz)
        np.savez(files.npz, arr_0=np.concatenate(pixels), labels=np.concatenate(labels),
                 indices=np.arange(first, first + n, dtype=np.int64))
    if grid_images and int(cfg.get("grid_size", 64)) > 0:
        grid = torch.cat(grid_images)[: int(cfg.get("grid_size", 64))]
        image_grid(grid, cfg.get("grid_nrow")).save(files.grid)
        result["grid"] = str(files.grid)
    files.summary.write_text(json.dumps(result, indent=2))
    decoded = (f"; decoded by the autoencoder in {decode_seconds:.2f} s more"
               if space.latent else "")
    print(f"{n} samples with {settings.name} ({schedule.describe()}) in {tally.seconds:.2f} s "
          f"({tally.seconds_per_image * 1e3:.1f} ms/image){decoded}; iterations per block "
          f"{ {b: round(v, 1) for b, v in tally.mean_iters().items()} }; written to {out}")
    return result


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="sample")
def _hydra_main(cfg: DictConfig) -> None:
    # A bad config or checkpoint is one line, not a traceback; printed lines go to sample.log.
    with one_line_errors(), job_log():
        check_job_types(cfg)  # num_samples=abc: one line naming the key
        run(cfg)


def main() -> None:
    """Console entry point (user errors: one ``error: ...`` line, exit status 2)."""
    cli_main(_hydra_main)


if __name__ == "__main__":
    main()
