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
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from tarflow.app import help as _help  # noqa: F401  (registers the --help resolvers)
from tarflow.app.checks.config_types import check_job_types
from tarflow.app.checks.sample import check_sample_config, sample_job
from tarflow.app.errors import cli_main, one_line_errors
from tarflow.app.logs import job_log
from tarflow.app.runs import save_records
from tarflow.app.sample_outputs import SampleFiles, clear_outputs
from tarflow.conf import CONFIG_DIR
from tarflow.eval import images_to_uint8
from tarflow.eval.fid_at_n import draw_set
from tarflow.eval.plots import image_grid
from tarflow.model.loading import load_for_sampling
from tarflow.sampling.choose import choose_schedule
from tarflow.sampling.sample_set import SampledBatch, run_summary
from tarflow.sampling.settings import parse_sampler

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Sample ``cfg.num_samples`` images and write them; returns the summary dict (plus
    ``out_dir``, and the written ``npz`` / ``grid`` paths)."""
    checked = check_sample_config(cfg)
    fmt = str(cfg.get("format", "png"))
    save_records(cfg)
    settings = parse_sampler(OmegaConf.to_container(cfg.sampler, resolve=True))
    loaded = load_for_sampling(cfg.ckpt_path, device=cfg.get("device"),
                               dtype=cfg.get("dtype", "float32"),
                               autoencoder_path=cfg.get("autoencoder_path"), summary=checked)
    net, space = loaded.net, loaded.space
    probe = OmegaConf.to_container(cfg.get("probe") or {}, resolve=True)
    n, batch = int(cfg.num_samples), int(cfg.batch_size)
    first = int(cfg.get("first_index", 0))
    schedule, plan = choose_schedule(settings, net, batch_size=min(batch, n), probe=probe,
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
    grid_size = int(cfg.get("grid_size", 64))
    pixels, labels, grid_images = [], [], []

    def write(b: SampledBatch, images: torch.Tensor) -> None:
        images = images.cpu()
        uint8 = images_to_uint8(images)[:, : space.image_shape[0]]
        hwc = uint8.permute(0, 2, 3, 1).numpy()  # (B, C, H, W) -> (B, H, W, C)
        if fmt != "npz":
            for i, img in zip(b.indices, hwc, strict=True):
                Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(files.png(i))
        if fmt != "png":
            pixels.append(hwc)
            labels.append(b.labels.cpu().numpy() if b.labels is not None
                          else np.zeros(len(b.indices), np.int64))
        if sum(x.shape[0] for x in grid_images) < grid_size:
            grid_images.append(images)

    run_ = draw_set(net, range(first, first + n), schedule, seed=int(cfg.seed),
                      batch_size=batch, knobs=settings.knobs, space=space,
                      label=None if label is None else int(label), on_batch=write,
                      progress=bool(cfg.get("progress", True)))
    tally, decode_seconds = run_.tally, run_.decode_seconds
    result = run_summary(settings, schedule, tally, plan)
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
    if grid_images and grid_size > 0:
        grid = torch.cat(grid_images)[:grid_size]
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
