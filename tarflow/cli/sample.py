"""``tarflow-sample``: a checkpoint -> N images (PNG files and/or one NPZ), any sampler, on one
process or N ranks, resumable.

Examples::

    tarflow-sample ckpt_path=outputs/demo/<time>/checkpoints/last.ckpt
    tarflow-sample ckpt_path=... sampler=gs_jacobi_auto probe.dataset=demo num_samples=1000
    tarflow-sample ckpt_path=... sampler=gs_jacobi sampler.schedule="'[3-8-16-10]'" format=npz
    torchrun --standalone --nproc-per-node=8 --no-python tarflow-sample ckpt_path=... \
        num_samples=50000 format=npz hydra.run.dir=outputs/fid50k
    # the same command after a kill, into the same folder, draws only what is missing:
    ... hydra.run.dir=outputs/fid50k if_exists=resume

Sample ``i`` starts from seed ``seed + i`` (noise, then its label), exactly as in validation, so
the result depends on the checkpoint, sampler, seed and N only: not on the number of ranks or the
batch size. The sampler is the one the checkpoint's validation used unless the command line
chooses one (``sampler=...``; :mod:`tarflow.app.eval_sampler`), so ``num_samples=100`` reproduces
the validation FID set.

Under torchrun or srun every rank joins one process group (:mod:`tarflow.app.distributed`); rank
0 picks the output folder, checks it, writes the records and, for ``schedule: auto``, plans the
schedule every rank samples with. Each rank writes its members as shards
(``shards/<first>-<last>.npz``, :mod:`tarflow.app.sample_shards`) after ``sample_job.json`` says
which set they belong to; rank 0 then assembles ``samples.npz`` (ADM's layout: ``arr_0`` (N, H,
W, C) uint8, ``arr_1`` labels, zeros for an unconditional model; and ``indices``),
``samples/<i>.png``, ``grid.png`` and ``sample_summary.json`` (timing, iterations per block,
schedule). ``if_exists`` (:mod:`tarflow.app.sample_outputs`) decides what happens in a folder
that holds samples: refuse, resume the same set, or overwrite what the records list.

Latent models (a checkpoint that records an autoencoder) are sampled in latent space and decoded
to images transparently, in chunks; the timing covers the sampler only, and the summary gives the
decoding time separately. ``autoencoder_path=`` points at a copy of the recorded autoencoder on a
machine where its recorded path does not exist (its weights fingerprint must match).

:func:`run` is the testable core; :func:`main` is the ``@hydra.main`` wrapper.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from tarflow.app import distributed
from tarflow.app import help as _help  # noqa: F401  (registers the --help resolvers)
from tarflow.app.checks.config_types import check_job_types
from tarflow.app.checks.sample import check_sample_config
from tarflow.app.errors import cli_main, one_line_errors
from tarflow.app.eval_sampler import choose_sampler, sampler_lines, task_overrides
from tarflow.app.logs import job_log
from tarflow.app.runs import save_records
from tarflow.app.sample_job import draw_missing, finish_set, on_main, shared_out_dir, together
from tarflow.app.sample_outputs import SUMMARY, clear_outputs, outputs_of
from tarflow.app.sample_shards import SampleFolder
from tarflow.app.sweep_jobs import run_job
from tarflow.conf import CONFIG_DIR
from tarflow.files import atomic_write
from tarflow.model.loading import load_for_sampling, pick_device
from tarflow.sampling.choose import choose_schedule
from tarflow.sampling.plan import Plan
from tarflow.sampling.sample_set import run_summary
from tarflow.sampling.schedule import SamplingSchedule
from tarflow.sampling.settings import parse_sampler

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Sample ``cfg.num_samples`` images on this launch's ranks and write them; returns the
    summary dict (plus ``out_dir``, and the written ``npz`` / ``grid`` paths) on rank 0, None
    on the other ranks."""
    world = distributed.setup()
    try:
        return _run(cfg, world)
    finally:
        distributed.teardown()


def _run(cfg: DictConfig, world: distributed.World) -> dict[str, Any] | None:
    started = time.perf_counter()
    cfg.out_dir = shared_out_dir(world, str(cfg.out_dir))
    # By default the sampler the checkpoint's validation used (as tarflow-eval does).
    sampling, checked = together(world, lambda: (choose_sampler(cfg, task_overrides()),
                                                 check_sample_config(cfg, world)))
    fmt, n = str(cfg.get("format", "png")), int(cfg.num_samples)
    settings = parse_sampler(OmegaConf.to_container(cfg.sampler, resolve=True))
    device = pick_device(cfg.get("device"))
    if device.type == "cuda" and world.distributed and device.index is None:
        device = f"cuda:{world.local_rank}"
    loaded = together(world, lambda: load_for_sampling(
        cfg.ckpt_path, device=device, dtype=cfg.get("dtype", "float32"),
        autoencoder_path=cfg.get("autoencoder_path"), summary=checked.summary))
    net, space = loaded.net, loaded.space
    folder = SampleFolder(cfg.out_dir)
    batch = int(cfg.batch_size)

    def prepare() -> tuple[SamplingSchedule, dict | None]:
        """Rank 0: records, the schedule (planned once; a resume reuses the recorded one) and
        the job file, before any sample is drawn."""
        save_records(cfg)
        for line in sampler_lines(sampling, OmegaConf.to_container(cfg.sampler, resolve=True)):
            print(line)
        job = checked.resumed
        if str(cfg.get("if_exists")) == "overwrite":
            removed = clear_outputs(folder.root)
            if removed:
                log.info("if_exists=overwrite: removed %d earlier sample file(s) from %s",
                         removed, folder.root)
        if job is not None:
            schedule = SamplingSchedule.from_dict(job["schedule"], name=job["schedule_name"])
            plan = job.get("plan")
            print(f"resuming the set of {folder.job_path} with its schedule "
                  f"{schedule.describe()}: {len(folder.done())} shard(s) done")
        else:
            probe = OmegaConf.to_container(cfg.get("probe") or {}, resolve=True)
            # Planned for the batches drawn: no batch spans two shards.
            schedule, planned = choose_schedule(settings, net,
                                                batch_size=min(batch, int(cfg.shard_size), n),
                                                probe=probe, space=space,
                                                plan_cache=cfg.paths.get("plan_cache"))
            plan = None if planned is None else planned.to_dict()
        outputs = sorted({*(job or {}).get("outputs", []),
                          *outputs_of(fmt, int(cfg.get("grid_size", 64)))})
        folder.write_job({"identity": checked.identity, "checkpoint_path": str(
            checked.summary.path.resolve()), "schedule": schedule.to_dict(),
            "schedule_name": schedule.name, "plan": plan, "outputs": outputs,
            "pngs": bool((job or {}).get("pngs")) or fmt != "npz"})
        return schedule, plan

    schedule, plan = on_main(world, prepare)
    label = cfg.get("label")
    missing, _ = together(world, lambda: draw_missing(
        net, folder, schedule, world=world, total=n, shard_size=int(cfg.shard_size),
        seed=int(cfg.seed), batch_size=batch, knobs=settings.knobs, space=space,
        label=None if label is None else int(label), progress=bool(cfg.get("progress", True))))

    def finish() -> dict[str, Any]:
        written = finish_set(folder, n, fmt=fmt, grid_size=int(cfg.get("grid_size", 64)),
                             grid_nrow=cfg.get("grid_nrow"))
        return _summary(cfg, world, written, settings, schedule, plan, sampling, missing,
                        time.perf_counter() - started)

    result = on_main(world, finish)
    if world.is_main and space.latent:  # which autoencoder decoded the set (its fingerprint)
        result["autoencoder"] = space.record.to_dict()
        atomic_write(Path(cfg.out_dir) / SUMMARY, json.dumps(result, indent=2, default=str))
    return result if world.is_main else None


def _summary(cfg: DictConfig, world: distributed.World, written: dict[str, Any], settings,
             schedule: SamplingSchedule, plan: dict | None, sampling: dict[str, Any],
             missing: int, wall: float) -> dict[str, Any]:
    """``sample_summary.json`` (written) and the printed line."""
    tally = written.pop("tally")
    decode = written.pop("decode_seconds")
    result = run_summary(settings, schedule, tally, None if plan is None else Plan.from_dict(plan))
    out = Path(cfg.out_dir)
    if decode:
        result["decode_seconds"] = decode  # not in "seconds", which times the sampler
    result.update(sampling, ranks=world.size, drawn_by_this_job=missing, wall_seconds=wall,
                  seed=int(cfg.seed), label=cfg.get("label"), out_dir=str(out), **written)
    atomic_write(out / SUMMARY, json.dumps(result, indent=2, default=str))
    resumed = "" if missing == tally.images else f" ({missing} drawn now, the rest resumed)"
    print(f"{tally.images} samples with {settings.name} ({schedule.describe()}) on {world.size} "
          f"rank(s) in {wall:.2f} s wall{resumed}; sampler {tally.seconds_per_image * 1e3:.1f} "
          f"ms/image; iterations per block "
          f"{ {b: round(v, 1) for b, v in tally.mean_iters().items()} }; written to {out}")
    return result


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="sample")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Returns the seconds per image (a sweeper can minimise it); in a sweep, a failed job is
    recorded and returns None (:func:`~tarflow.app.sweep_jobs.run_job`)."""
    return run_job(lambda: _job(cfg))


def _job(cfg: DictConfig) -> float | None:
    # A bad config or checkpoint is one line, not a traceback; printed lines go to sample.log.
    # Only the first rank of a launch logs (the others' run dirs are removed again).
    logged = job_log() if distributed.world_from_env().is_main else nullcontext()
    with one_line_errors(), logged:
        check_job_types(cfg)  # num_samples=abc: one line naming the key
        result = run(cfg)
    return None if result is None else result.get("seconds_per_image")  # None: not rank 0


def main() -> None:
    """Console entry point (user errors: one ``error: ...`` line, exit status 2)."""
    cli_main(_hydra_main)


if __name__ == "__main__":
    main()
