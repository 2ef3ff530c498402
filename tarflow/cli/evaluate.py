"""``tarflow-eval``: a checkpoint -> bits/dim on a split and/or FID@N with a chosen sampler.

Examples::

    tarflow-eval ckpt_path=outputs/demo/<time>/checkpoints/last.ckpt            # bpd + FID@100
    tarflow-eval ckpt_path=... sampler=gs_jacobi_auto fid.num_samples=1000 bpd.enabled=false
    tarflow-eval ckpt_path=... hparams_search=gs_jacobi_grid     # Hydra sweep over schedules

FID uses the validation callback's recipe: the fixed sample set (member ``i`` from seed
``seed + i``) and reference statistics cached under ``paths.fid_stats_dir`` (computed on first
use, or beforehand with ``scripts/prepare_fid_stats.py``). Results (``val/bpd``, ``val/fid_<N>``,
seconds per image, iterations per block, the absolute checkpoint path and the data used) are
printed, logged to ``evaluate.log`` and written to ``<out_dir>/eval.json``; the return value of
:func:`main` is ``fid.optimized`` (FID by default), so a sweeper can minimise it, and a
``--multirun`` sweep ends with a table of all jobs (:mod:`tarflow.app.sweep_summary`).

Latent models (a checkpoint that records an autoencoder): the likelihood pass reports
``val/latent_nll`` (the training objective per latent dimension, on the encoded split with the
model's latent noise; there are no pixel bits per dimension), and FID decodes the samples before
the feature extractor, against the reference statistics of the real images.

FID samples with the sampler the checkpoint's validation used (recorded in the checkpoint, or
in its run's records) unless the command line chooses one (:mod:`tarflow.app.eval_sampler`);
the output and ``eval.json`` name the sampler used and the validation one.

The data defaults to what the checkpoint records it was trained on, and
:func:`~tarflow.app.checks.sample.check_eval_config` refuses a config that cannot work (the
sampler, counts, device, a dataset other than the recorded one) before the first image is read.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tarflow.app import help as _help  # noqa: F401  (registers the --help resolvers)
from tarflow.app.checks.config_types import check_job_types
from tarflow.app.checks.sample import check_eval_config, fid_stats_path
from tarflow.app.errors import cli_main, one_line_errors
from tarflow.app.eval_sampler import choose_sampler, sampler_lines
from tarflow.app.logs import job_log
from tarflow.app.runs import save_records, write_keeping_previous
from tarflow.conf import CONFIG_DIR
from tarflow.data import build_dataset
from tarflow.eval.fid_at_n import feature_extractor, fid_at_n
from tarflow.eval.fid_reference import reference_provenance, reference_stats
from tarflow.eval.likelihood import likelihood
from tarflow.model import TarFlow
from tarflow.model.loading import load_for_sampling
from tarflow.model.space import PixelSpace
from tarflow.sampling.choose import choose_schedule
from tarflow.sampling.sample_set import run_summary
from tarflow.sampling.settings import parse_sampler

log = logging.getLogger(__name__)


def _dataset(space: PixelSpace, data: dict[str, Any], split: str):
    """The images of a split at the checkpoint's image size (a latent model's: decoded)."""
    channels, side, _ = space.image_shape
    return build_dataset(data["name"], root=data.get("root"), img_size=side, split=split,
                         channels=channels, flip=False, **(data.get("dataset_kwargs") or {}))


def _fid(net: TarFlow, cfg: DictConfig, data: dict[str, Any], fid: dict[str, Any],
         progress: bool, space: PixelSpace) -> dict[str, Any]:
    """FID@N with ``cfg.sampler`` against the cached reference statistics of the data, and
    what it cost (:func:`tarflow.eval.fid_at_n.fid_at_n` does the work)."""
    settings = parse_sampler(OmegaConf.to_container(cfg.sampler, resolve=True))
    probe = {"dataset": data["name"], "root": data.get("root"),
             "dataset_kwargs": data.get("dataset_kwargs"),
             **OmegaConf.to_container(cfg.get("probe") or {}, resolve=True)}
    n, batch = int(fid["num_samples"]), int(fid.get("batch_size") or 64)
    schedule, plan = choose_schedule(settings, net, batch_size=min(batch, n), probe=probe,
                                     plan_cache=cfg.paths.get("plan_cache"), space=space)
    device = next(net.parameters()).device
    feature_batch = int(fid.get("feature_batch_size") or 64)
    extractor = feature_extractor(fid.get("extractor"), weights=fid.get("inception_weights"),
                                  batch_size=feature_batch, device=device)
    ref_split = fid.get("reference_split") or "train"
    stats_path = fid_stats_path(cfg, space.image_shape)
    t0 = time.perf_counter()
    reference = reference_stats(stats_path, _dataset(space, data, ref_split), extractor,
                                split=ref_split, count=int(fid.get("reference_size") or 500),
                                seed=int(fid.get("reference_seed") or 0),
                                batch_size=feature_batch, device=device, progress=progress)
    ref_seconds = time.perf_counter() - t0
    value, run = fid_at_n(net, schedule, reference, extractor, num_samples=n,
                          seed=int(fid.get("seed") or 0), batch_size=batch,
                          knobs=settings.knobs, space=space, progress=progress)
    return {f"val/fid_{n}": value, **run_summary(settings, schedule, run.tally, plan),
            # The file read: named for the images it holds when fewer exist than asked for.
            "fid_stats_path": reference.meta.get("path", stats_path),
            "fid_reference": reference_provenance(reference),
            "reference_seconds": ref_seconds, "feature_seconds": run.feature_seconds,
            **({"decode_seconds": run.decode_seconds} if space.latent else {})}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate as configured; returns the results dict (also written to ``eval.json``)."""
    # By default FID samples as validation did (the checkpoint records its sampler).
    sampling = choose_sampler(cfg, _task_overrides()) if cfg.fid.enabled else None
    checked = check_eval_config(cfg)  # also fills in cfg.data from the checkpoint's record
    save_records(cfg)
    loaded = load_for_sampling(cfg.ckpt_path, device=cfg.get("device"),
                               dtype=cfg.get("dtype", "float32"),
                               autoencoder_path=cfg.get("autoencoder_path"), summary=checked)
    net, space = loaded.net, loaded.space
    data = OmegaConf.to_container(cfg.data, resolve=True)
    progress = bool(cfg.get("progress", True))
    results: dict[str, Any] = {"checkpoint": str(checked.path.resolve()),
                               "model": net.config.tag,
                               "data": {k: data.get(k) for k in ("name", "root", "split")},
                               "overrides": _task_overrides()}
    if space.latent:
        results["autoencoder"] = space.record.to_dict()
    if cfg.bpd.enabled:  # the likelihood pass: pixel bits/dim, or a latent model's latent NLL
        ds = _dataset(space, data, data.get("split") or "val")
        results.update(likelihood(net, space, ds, batch_size=int(data.get("batch_size") or 256),
                                  max_images=data.get("max_images"),
                                  seed=int(cfg.bpd.get("seed") or 0), progress=progress))
    if cfg.fid.enabled:
        # instantiate() turns an `extractor: {_target_: ...}` node into the object (tests use a
        # small seeded conv net); everything else stays plain.
        fid = OmegaConf.to_container(cfg.fid, resolve=True)
        fid["extractor"] = instantiate(cfg.fid.extractor) if cfg.fid.get("extractor") else None
        used = OmegaConf.to_container(cfg.sampler, resolve=True)
        for line in sampler_lines(sampling, used):
            print(line)
        results.update(sampler_settings=used, **sampling)
        results.update(_fid(net, cfg, data, fid, progress, space))
    out = Path(cfg.out_dir)
    kept = write_keeping_previous(out / "eval.json", json.dumps(results, indent=2, default=str))
    if kept is not None:
        print(f"the earlier results in this folder were kept as {kept}")
    for key, value in results.items():
        if isinstance(value, float):
            print(f"{key}: {value:.4f}")
    print(f"results written to {out / 'eval.json'}")
    return results


def _task_overrides() -> list[str]:
    """The command line's overrides of this job (a sweep's summary table shows them)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="eval")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Returns the ``optimized_metric`` for Hydra sweepers."""
    # A bad config or checkpoint is one line, not a traceback; printed lines go to evaluate.log.
    with one_line_errors(), job_log():
        check_job_types(cfg)  # fid.num_samples=abc: one line naming the key
        results = run(cfg)
    key = cfg.get("optimized_metric") or f"val/fid_{cfg.fid.num_samples}"
    value = results.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def main() -> float | None:
    """Console entry point (user errors: one ``error: ...`` line, exit status 2)."""
    return cli_main(_hydra_main)


if __name__ == "__main__":
    main()
