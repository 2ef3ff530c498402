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

Before any work :func:`~tarflow.cli.sample_checks.check_sample_config` checks the config against
the checkpoint and the output folder: a folder that already holds samples is refused unless
``if_exists=overwrite`` (its sample files are deleted first) or ``if_exists=append`` with
``first_index`` (another range of the same set; :mod:`tarflow.cli.sample_outputs`). What is
printed also goes to ``sample.log``.

:func:`run` is the testable core; :func:`main` is the ``@hydra.main`` wrapper.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from tarflow.cli.errors import cli_main, one_line_errors
from tarflow.cli.logs import job_log
from tarflow.cli.runs import save_records
from tarflow.cli.sample_checks import check_sample_config, sample_job
from tarflow.cli.sample_outputs import SampleFiles, clear_outputs
from tarflow.eval import images_to_uint8
from tarflow.lit.callbacks.plots import image_grid
from tarflow.lit.callbacks.reference import fixed_subset, stack_items
from tarflow.lit.callbacks.sample_set import IterationTally, fixed_inputs, sample_batches
from tarflow.lit.callbacks.sampler_config import SamplerSettings, parse_sampler
from tarflow.model import TarFlow
from tarflow.sampling import Plan, PlanCache, SamplingSchedule, rank_blocks, ranking_table, sample
from tarflow.sampling.plan import device_name

log = logging.getLogger(__name__)
# Absolute path: a relative config_path would be read as a Python package by the console script.
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


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


def probe_batch(net: TarFlow, probe: dict[str, Any]) -> tuple[torch.Tensor, str]:
    """(M, C, H, W) images for the CRM/IGM ranking and where they came from.

    ``probe.dataset`` names a dataset (real images, as the paper does); null falls back to the
    model's own sequential samples (slower, and only as good as the model).
    """
    cfg = net.config
    size = int(probe.get("size") or 256)
    param = next(net.parameters())
    if probe.get("dataset"):
        from tarflow.data import build_dataset

        ds = build_dataset(probe["dataset"], root=probe.get("root"), img_size=cfg.img_size,
                           split=probe.get("split") or "train", channels=cfg.in_channels,
                           flip=False, **(probe.get("dataset_kwargs") or {}))
        images = stack_items(ds, fixed_subset(ds, size, int(probe.get("seed") or 0)))[0]
        return images.to(param.device, param.dtype), f"{images.shape[0]} {probe['dataset']} images"
    noise, y = fixed_inputs(net, range(size), int(probe.get("seed") or 0))
    images, _ = sample(net, noise, y)
    return images, f"{size} sequential samples of the model (probe.dataset is null)"


def resolve_schedule(settings: SamplerSettings, net: TarFlow, probe: dict[str, Any], *,
                     batch_size: int, plan_cache: str | None = None
                     ) -> tuple[SamplingSchedule, Plan | None]:
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
        images, where = probe_batch(net, probe)
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
    probe = OmegaConf.to_container(cfg.get("probe") or {}, resolve=True)
    n, batch = int(cfg.num_samples), int(cfg.batch_size)
    first = int(cfg.get("first_index", 0))
    schedule, plan = resolve_schedule(settings, net, probe, batch_size=min(batch, n),
                                      plan_cache=cfg.paths.get("plan_cache"))
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
    batches = sample_batches(net, range(first, first + n), schedule, seed=int(cfg.seed),
                             batch_size=batch, knobs=settings.knobs,
                             label=None if label is None else int(label))
    for b in progress_bar(batches, math.ceil(n / batch), bool(cfg.get("progress", True)),
                          "sampling"):
        tally.add(b)
        uint8 = images_to_uint8(b.images.float().cpu())[:, : net.config.in_channels]
        hwc = uint8.permute(0, 2, 3, 1).numpy()  # (B, C, H, W) -> (B, H, W, C)
        if fmt != "npz":
            for i, img in zip(b.indices, hwc, strict=True):
                Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(files.png(i))
        if fmt != "png":
            pixels.append(hwc)
            labels.append(b.labels.cpu().numpy() if b.labels is not None
                          else np.zeros(len(b.indices), np.int64))
        if sum(x.shape[0] for x in grid_images) < int(cfg.get("grid_size", 64)):
            grid_images.append(b.images.float().cpu())
    result = summary_of(settings, schedule, tally, plan)
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
    print(f"{n} samples with {settings.name} ({schedule.describe()}) in {tally.seconds:.2f} s "
          f"({tally.seconds_per_image * 1e3:.1f} ms/image); iterations per block "
          f"{ {b: round(v, 1) for b, v in tally.mean_iters().items()} }; written to {out}")
    return result


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="sample")
def _hydra_main(cfg: DictConfig) -> None:
    # A bad config or checkpoint is one line, not a traceback; printed lines go to sample.log.
    with one_line_errors(), job_log():
        run(cfg)


def main() -> None:
    """Console entry point (user errors: one ``error: ...`` line, exit status 2)."""
    cli_main(_hydra_main)


if __name__ == "__main__":
    main()
