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
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tarflow.app import help as _help  # noqa: F401  (registers the --help resolvers)
from tarflow.app.checks.config_types import check_job_types
from tarflow.app.checks.eval_inputs import check_samples
from tarflow.app.checks.sample import check_eval_config, eval_image_shape, fid_stats_path
from tarflow.app.distributed import (
    World,
    all_sum,
    broadcast,
    setup,
    teardown,
    world_from_env,
)
from tarflow.app.errors import cli_main, one_line_errors
from tarflow.app.eval_log import log_evaluation
from tarflow.app.eval_metrics import (
    features_of_file,
    inception_score_unavailable,
    metric_lines,
    reduce_to_main,
    reference_features,
    run_together,
    score,
)
from tarflow.app.eval_sampler import choose_sampler, sampler_lines, task_overrides
from tarflow.app.logs import job_log
from tarflow.app.runs import remove_new_run_dir, save_records, write_keeping_previous
from tarflow.app.sweep_jobs import run_job
from tarflow.conf import CONFIG_DIR
from tarflow.data import build_dataset
from tarflow.eval.fid_at_n import draw_set, feature_extractor
from tarflow.eval.fid_reference import reference_provenance, reference_stats
from tarflow.eval.likelihood import likelihood
from tarflow.eval.metrics import SampleFeatures
from tarflow.eval.references import load_reference
from tarflow.eval.sample_files import load_rows, to_model_images
from tarflow.model import TarFlow
from tarflow.model.loading import load_for_sampling, pick_device
from tarflow.model.space import PixelSpace
from tarflow.model.student import NOT_A_FLOW, is_student
from tarflow.sampling.choose import choose_schedule
from tarflow.sampling.sample_set import run_summary, shard_indices
from tarflow.sampling.settings import parse_sampler

log = logging.getLogger(__name__)


def _dataset(shape: tuple[int, int, int], data: dict[str, Any], split: str):
    """The images of a split at the evaluated image size (C, H, W)."""
    channels, side, _ = shape
    return build_dataset(data["name"], root=data.get("root"), img_size=side, split=split,
                         channels=channels, flip=False, **(data.get("dataset_kwargs") or {}))


def _bpd(net: TarFlow, space: PixelSpace, data: dict[str, Any], cfg: DictConfig, world: World,
         progress: bool) -> dict[str, Any]:
    """Bits/dim (a latent model: latent NLL) over the split, its batches split over ranks."""
    ds = _dataset(space.image_shape, data, data.get("split") or "val")
    part = likelihood(net, space, ds, batch_size=int(data.get("batch_size") or 256),
                      max_images=data.get("max_images"), seed=int(cfg.bpd.get("seed") or 0),
                      progress=progress and world.is_main, shard=(world.rank, world.size))
    key = "val/latent_nll" if space.latent else "val/bpd"
    count = "latent_nll_images" if space.latent else "bpd_images"
    total = all_sum(torch.tensor([part[key] * part[count], part[count]]))
    return {**part, key: float(total[0] / total[1].clamp_min(1)), count: int(total[1])}


def _schedule(cfg: DictConfig, net: TarFlow, space: PixelSpace, data: dict[str, Any],
              n: int, batch: int, world: World):
    """The sampler's schedule, planned once on rank 0 (``schedule: auto``) and sent to all."""
    settings = parse_sampler(OmegaConf.to_container(cfg.sampler, resolve=True))
    chosen = None
    if world.is_main:
        probe = {"dataset": data["name"], "root": data.get("root"),
                 "dataset_kwargs": data.get("dataset_kwargs"),
                 **OmegaConf.to_container(cfg.get("probe") or {}, resolve=True)}
        chosen = choose_schedule(settings, net, batch_size=min(batch, n), probe=probe,
                                 plan_cache=cfg.paths.get("plan_cache"), space=space)
    schedule, plan = broadcast(chosen)
    return settings, schedule, plan


def _metrics(cfg: DictConfig, fid: dict[str, Any], data: dict[str, Any], world: World,
             loaded: Any, shape: tuple[int, int, int], progress: bool,
             grid: list[torch.Tensor]) -> dict[str, Any]:
    """FID, IS, KID, precision/recall of the fixed set (or of ``samples=``), each rank scoring
    its shard (:mod:`tarflow.app.eval_metrics`); the full results on rank 0, {} elsewhere."""
    device = loaded.device if loaded else pick_device(cfg.get("device"))
    feature_batch = int(fid.get("feature_batch_size") or 64)
    extractor = feature_extractor(fid.get("extractor"), weights=fid.get("inception_weights"),
                                  batch_size=feature_batch, device=device)
    opts = OmegaConf.to_container(cfg.metrics, resolve=True)
    samples = SampleFeatures(keep=bool(opts.get("per_sample", True)))
    grid_size = int((cfg.get("log") or {}).get("grid_size") or 0)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    if cfg.get("samples"):
        n = check_samples(cfg)[0]
        tally = None
        seconds = run_together(world, lambda: features_of_file(
            cfg.samples, world, n, extractor, samples, batch_size=feature_batch, device=device))
        times = all_sum(torch.tensor([0.0, 0.0, seconds]))
        if world.is_main and grid_size:
            grid.append(to_model_images(load_rows(cfg.samples, range(min(grid_size, n)))))
        out["samples"] = str(Path(cfg.samples).expanduser().resolve())
    else:
        net, space = loaded.net, loaded.space
        n, batch = int(fid["num_samples"]), int(fid.get("batch_size") or 64)
        settings, schedule, plan = _schedule(cfg, net, space, data, n, batch, world)
        out["seconds_planning"] = time.perf_counter() - t0
        t0 = time.perf_counter()

        def keep_grid(sampled, images):
            if world.is_main and sum(len(g) for g in grid) < grid_size:
                grid.append(images[:grid_size - sum(len(g) for g in grid)].cpu())

        run = run_together(world, lambda: draw_set(
            net, shard_indices(n, world.rank, world.size), schedule,
            seed=int(fid.get("seed") or 0), batch_size=batch, knobs=settings.knobs,
            space=space, extractor=extractor, samples=samples, on_batch=keep_grid,
            progress=progress and world.is_main, desc=f"FID@{n}"))
        tally = run.tally
        # Summed over ranks: seconds of sampling, of decoding and of features.
        times = all_sum(torch.tensor([run.tally.seconds, run.decode_seconds,
                                      run.feature_seconds]))
    merged, total = reduce_to_main(samples, tally)
    wall = time.perf_counter() - t0
    if not world.is_main:
        return {}
    if total is not None:
        out.update(run_summary(settings, schedule, total, plan))
    t1 = time.perf_counter()
    ref_split = fid.get("reference_split") or "train"
    ref_size, ref_seed = int(fid.get("reference_size") or 500), int(fid.get("reference_seed") or 0)
    stats_path = fid_stats_path(cfg, shape)
    dataset = _dataset(shape, data, ref_split) if data.get("name") else None
    reference = (reference_stats(stats_path, dataset, extractor, split=ref_split, count=ref_size,
                                 seed=ref_seed, batch_size=feature_batch, device=device,
                                 progress=progress) if dataset is not None
                 else load_reference(stats_path))
    protocol = extractor.protocol() if hasattr(extractor, "protocol") else {
        "extractor": str(getattr(extractor, "name", type(extractor).__qualname__)),
        "weights": None, "resize": "none (custom extractor)", "flips": "none"}
    ref_feats, ref_images = None, "per-sample metrics are off"
    if samples.keep:
        ref_feats, ref_images = reference_features(
            reference, extractor, dataset=dataset, subset=(ref_size, ref_seed),
            cache_dir=cfg.paths.fid_stats_dir, batch_size=feature_batch, device=device,
            extractor_id={k: protocol.get(k) for k in ("extractor", "weights_sha256")})
    reference_seconds = time.perf_counter() - t1
    metrics = score(merged, reference, ref_feats, opts, inception_score_unavailable(extractor),
                    ref_images)
    out.update({f"val/fid_{merged.count}": metrics["fid"], "num_samples": merged.count,
                **{k: v for k, v in metrics.items() if k != "fid"},
                "fid_stats_path": reference.meta.get("path", stats_path),
                "fid_reference": reference_provenance(reference),
                "protocol": {"reference": {**reference_provenance(reference),
                                           "images": ref_images if ref_feats is not None
                                           else None},
                             "num_samples": merged.count, "features": protocol,
                             "ranks": world.size,
                             "metrics": "torch-fidelity 0.4.0 definitions on pool3 features "
                                        "(IS: logits_unbiased)"},
                "seconds": {"sampling": float(times[0]), "decode": float(times[1]),
                            "features": float(times[2]), "wall_draw_and_features": wall,
                            "planning": out.pop("seconds_planning", 0.0),
                            "reference": reference_seconds,
                            "metrics": time.perf_counter() - t1 - reference_seconds},
                "reference_seconds": reference_seconds, "feature_seconds": float(times[2])})
    for line in metric_lines({**metrics, "num_samples": merged.count,
                              "protocol": out["protocol"]}):
        print(line)
    return out


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate as configured; returns the results dict (also written to ``eval.json``), on
    rank 0 of a multi-process launch (the other ranks return {} and write nothing)."""
    world = world_from_env()
    # By default FID samples as validation did (the checkpoint records its sampler).
    draws = cfg.fid.enabled and not cfg.get("samples") and cfg.get("ckpt_path")
    sampling = choose_sampler(cfg, task_overrides()) if draws else None
    checked = check_eval_config(cfg, world)  # also fills in cfg.data from the checkpoint's record
    save_records(cfg)
    setup(world)
    try:
        return _run(cfg, world, checked, sampling)
    finally:
        teardown()


def _run(cfg: DictConfig, world: World, checked: Any, sampling: dict | None) -> dict[str, Any]:
    out = Path(broadcast(str(cfg.out_dir)))  # one output folder: rank 0's
    if not world.is_main and Path(cfg.out_dir).resolve() != out.resolve():
        remove_new_run_dir()  # the empty run dir this rank's Hydra made (another timestamp)
    loaded = None
    if checked is not None:
        loaded = load_for_sampling(cfg.ckpt_path, device=cfg.get("device"),
                                   dtype=cfg.get("dtype", "float32"),
                                   autoencoder_path=cfg.get("autoencoder_path"), summary=checked)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    progress = bool(cfg.get("progress", True))
    results: dict[str, Any] = {"checkpoint": str(checked.path.resolve()) if checked else None,
                               "model": loaded.net.config.tag if loaded else None,
                               "data": {k: data.get(k) for k in ("name", "root", "split")},
                               "overrides": task_overrides(), "ranks": world.size}
    if loaded is not None and loaded.space.latent:
        results["autoencoder"] = loaded.space.record.to_dict()
    if cfg.bpd.enabled and loaded is not None and is_student(loaded.net):
        results["bpd"] = f"skipped: {NOT_A_FLOW}"
        print(f"bpd: skipped: {NOT_A_FLOW}")
    elif cfg.bpd.enabled and loaded is not None:  # pixel bits/dim, or a latent model's NLL
        results.update(_bpd(loaded.net, loaded.space, data, cfg, world, progress))
    grid: list[torch.Tensor] = []
    if cfg.fid.enabled:
        # instantiate() turns an `extractor: {_target_: ...}` node into the object (tests use a
        # small seeded conv net); everything else stays plain.
        fid = OmegaConf.to_container(cfg.fid, resolve=True)
        fid["extractor"] = instantiate(cfg.fid.extractor) if cfg.fid.get("extractor") else None
        if sampling is not None:
            used = OmegaConf.to_container(cfg.sampler, resolve=True)
            if world.is_main:
                for line in sampler_lines(sampling, used):
                    print(line)
            results.update(sampler_settings=used, **sampling)
        shape = eval_image_shape(checked, check_samples(cfg))
        results.update(_metrics(cfg, fid, data, world, loaded, shape, progress, grid))
    if not world.is_main:
        return {}
    kept = write_keeping_previous(out / "eval.json", json.dumps(results, indent=2, default=str))
    if kept is not None:
        print(f"the earlier results in this folder were kept as {kept}")
    log_evaluation(cfg, out, results, torch.cat(grid) if grid else None)
    for key, value in results.items():
        if isinstance(value, float):
            print(f"{key}: {value:.4f}")
    print(f"results written to {out / 'eval.json'}")
    return results


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="eval")
def _hydra_main(cfg: DictConfig) -> float | list[float | None] | None:
    """Returns the ``optimized_metric`` for Hydra sweepers: one value, or a list of them for a
    list of keys (a multi-objective search); in a sweep, a failed job is recorded and returns
    None (:func:`~tarflow.app.sweep_jobs.run_job`)."""
    return run_job(lambda: _job(cfg))


def _job(cfg: DictConfig) -> float | list[float | None] | None:
    # A bad config or checkpoint is one line, not a traceback; printed lines go to evaluate.log.
    with one_line_errors(), job_log():
        check_job_types(cfg)  # fid.num_samples=abc: one line naming the key
        results = run(cfg)
    keys = cfg.get("optimized_metric") or f"val/fid_{cfg.fid.num_samples}"

    def value(key: str) -> float | None:
        found = results.get(str(key))
        return float(found) if isinstance(found, (int, float)) else None

    return value(keys) if isinstance(keys, str) else [value(k) for k in keys]


def main() -> float | None:
    """Console entry point (user errors: one ``error: ...`` line, exit status 2)."""
    return cli_main(_hydra_main)


if __name__ == "__main__":
    main()
