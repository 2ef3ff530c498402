"""``tarflow-train``: train a TarFlow from the Hydra configs in ``tarflow/conf/``.

Examples::

    tarflow-train                                    # the digits demo on the CPU (experiment=demo)
    tarflow-train experiment=img64_cond data.root=/data/imagenet64
    tarflow-train debug=fast_dev_run
    tarflow-train ckpt_path=outputs/demo/<time>/checkpoints/last.ckpt \\
        hydra.run.dir=outputs/demo/<time>          # resume in the same run dir (same W&B run)
    tarflow-train init_from=afhq_model_8_768_8_8_0.07.pth experiment=afhq256_cond  # fine-tune
    tarflow-train --multirun module.optim.lr=5e-4,1e-3   # single device or ddp_spawn

:func:`train` is the testable core (it takes a composed DictConfig); :func:`main` is the thin
``@hydra.main`` wrapper. This is ring 3: the only place where a DictConfig is seen; everything
below receives plain values (``_convert_: all``).

Before anything starts, :func:`check_config` refuses settings that cannot work (including a
checkpoint that does not fit the config, and a new run aimed at another run's directory) and
the data is read; such errors print as one ``error: ...`` line with exit status 2
(:mod:`tarflow.app.errors`, ``TARFLOW_DEBUG=1`` for the traceback), and leave the run directory
untouched: the ``.hydra`` records are written only after these checks
(:mod:`tarflow.app.runs`), numbered when a resume finds earlier ones. A resume restores the
overrides its run was started with (:func:`main`). During the run, failing logger calls only
warn (:mod:`tarflow.lit.safe_logging`) and checkpoints are replaced atomically
(:mod:`tarflow.lit.checkpoint_io`).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.plugins.io import CheckpointIO
from omegaconf import DictConfig, OmegaConf

from tarflow.app import help as _help  # noqa: F401  (registers the --help resolvers)
from tarflow.app.checks.config_types import check_job_types
from tarflow.app.checks.startup import describe_processes, probe_trainer
from tarflow.app.checks.sweeps import check_sweep_job
from tarflow.app.checks.train import check_config
from tarflow.app.errors import cli_main, in_multirun, one_line_errors
from tarflow.app.launchers import cluster_plugins, resume_sweep_job
from tarflow.app.logs import held_file_log, job_log
from tarflow.app.runs import Resume, config_changes, describe_changes, resume_argv, save_records
from tarflow.app.sweep_jobs import run_job
from tarflow.app.train_sweep import RESULT, name_sweep_job, write_result
from tarflow.conf import CONFIG_DIR
from tarflow.eval.fid_at_n import class_grid
from tarflow.eval.plots import image_grid
from tarflow.lit.callbacks.epoch_log import EpochLog
from tarflow.lit.checkpoint_io import AtomicCheckpointIO
from tarflow.lit.safe_logging import guard_loggers
from tarflow.lit.wandb_utils import finish_wandb
from tarflow.model import TarFlow, load_weights
from tarflow.model.space import PixelSpace
from tarflow.sampling import SamplingSchedule
from tarflow.sampling.settings import parse_sampler

log = logging.getLogger(__name__)


def _instantiate_dict(group: DictConfig | None, what: str) -> list[Any]:
    """Instantiate every ``_target_`` entry of a ``name: {...}`` config group, in order."""
    objects = []
    for name, node in (group or {}).items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            # e.g. an experiment tuning `callbacks.ema.decay` while callbacks=none.
            warnings.warn(f"{what}.{name} has no _target_; skipped", stacklevel=2)
            continue
        objects.append(instantiate(node, _convert_="all"))
    return objects


def configured_callbacks(cfg: DictConfig, extra: list[Callback] | None = None) -> list[Callback]:
    """The run's callbacks: the configured ones, then ``extra``, then an :class:`EpochLog`."""
    callbacks: list[Callback] = _instantiate_dict(cfg.get("callbacks"), "callbacks")
    callbacks += list(extra or [])
    if cfg.trainer.get("fast_dev_run"):
        # Lightning skips ModelCheckpoint's saves under fast_dev_run, except the save_last of
        # its on_train_end (2.6): a smoke run would leave a full checkpoint behind.
        callbacks = [cb for cb in callbacks if not isinstance(cb, ModelCheckpoint)]
    if not any(isinstance(cb, EpochLog) for cb in callbacks):
        callbacks.append(EpochLog())
    return callbacks


def build(
    cfg: DictConfig,
    extra_callbacks: list[Callback] | None = None,
    *,
    datamodule: L.LightningDataModule | None = None,
) -> dict[str, Any]:
    """Instantiate datamodule, module, callbacks, loggers and trainer from a composed config.

    Every logger is guarded (:mod:`tarflow.lit.safe_logging`: a failing logging call warns and
    training goes on), checkpoints are written atomically
    (:class:`~tarflow.lit.checkpoint_io.AtomicCheckpointIO`) unless the trainer config brings
    its own ``CheckpointIO`` plugin, and an :class:`EpochLog` writes one line per epoch.

    Args:
        cfg: the composed ``train`` config.
        extra_callbacks: appended after the configured ones (tests, notebooks).
        datamodule: an already built datamodule to use instead of ``cfg.data``.

    Returns:
        dict with keys ``datamodule``, ``module``, ``callbacks``, ``loggers``, ``trainer``.
    """
    if datamodule is None:
        datamodule = instantiate(cfg.data, _convert_="all")
    module = instantiate(cfg.module, _convert_="all")
    callbacks = configured_callbacks(cfg, extra_callbacks)
    loggers: list[Logger] = guard_loggers(_instantiate_dict(cfg.get("logger"), "logger"))
    plugins = list(instantiate(cfg.trainer.get("plugins") or [], _convert_="all"))
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    plugins += cluster_plugins(plugins)  # a submitit SLURM job: submitit alone requeues
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins, _convert_="all"
    )
    return dict(
        datamodule=datamodule, module=module, callbacks=callbacks, loggers=loggers, trainer=trainer
    )


def _checkpoint_paths(trainer: L.Trainer) -> tuple[str | None, str | None]:
    """(last, best) checkpoint paths of the first ModelCheckpoint callback, if any were saved."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            last = cb.last_model_path or None
            best = cb.best_model_path or None
            return last, best
    return None, None


@torch.no_grad()
def write_sample_grid(
    net: TarFlow,
    path: Path,
    sampler: dict,
    *,
    per_class: int = 8,
    max_classes: int = 10,
    seed: int = 0,
    space: PixelSpace | None = None,
) -> Path:
    """Sample a grid (one row per class, ``per_class`` columns; :func:`class_grid`) with the
    ``sampler`` config's schedule and knobs and save it as a PNG. A run-time schedule (which
    needs a ranking, and the planner a batch to time) uses the exact sequential loop here."""
    net.eval()
    settings = parse_sampler(sampler)
    schedule = SamplingSchedule.sequential() if settings.is_auto else settings.schedule
    images = class_grid(net, schedule, per_class=per_class, max_classes=max_classes, seed=seed,
                        knobs=settings.knobs, space=space)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The validation grids' drawing: clipped to [-1, 1], small images enlarged (a 16x16 digit
    # drawn 1:1 is a 137x171 picture nobody can read).
    image_grid(images, nrow=per_class).save(path)
    return path


def train(
    cfg: DictConfig,
    *,
    callbacks: list[Callback] | None = None,
    on_start: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train from a composed config.

    Args:
        cfg: the composed ``train`` config (``paths.output_dir`` must be resolvable).
        callbacks: extra callbacks appended after the configured ones.
        on_start: called once the checks have passed and the data was read, before any logger
            or checkpoint exists (the CLI writes the run's records there).

    Returns:
        dict: ``metrics`` (final callback metrics as floats), ``last_ckpt`` and ``best_ckpt``
        (paths or None), ``output_dir``, ``samples`` (grid PNG path or None), ``seconds``
        (wall time of the fit) and ``trainer``.

    Raises:
        ValueError, FileNotFoundError: settings that cannot work (:func:`check_config`) or
            unusable data, before a logger or the Trainer starts.
        FloatingPointError: a non-finite training loss (no checkpoint is written after it).
    """
    check_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = instantiate(cfg.data, _convert_="all")
    # Read the data now: a wrong root or unusable files fail here, before a W&B run or the
    # Trainer starts. Lightning's own setup("fit") call then finds the datasets built. The
    # datasets draw from their own seeded generators, so this does not shift the global RNG.
    datamodule.setup("fit")
    # What Lightning refuses only when the Trainer is built (no GPU here, max_epochs=-3), before
    # any record; and what will run, said once it starts.
    probe = probe_trainer(cfg, lambda: configured_callbacks(cfg, callbacks))
    processes, oversubscribed = describe_processes(probe, cfg.data.get("num_workers") or 0)
    if on_start is not None:
        on_start()
    log.info(processes)
    if oversubscribed:
        log.warning("more busy processes than CPU cores: each runs slower than alone (lower "
                    "data.num_workers, or trainer.devices)")
    if cfg.get("seed") is not None:
        # Logged through our logger: Lightning's own line would go to stderr, where a start-up
        # error must stand alone.
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        log.info("seed set to %d", int(cfg.seed))
    parts = build(cfg, callbacks, datamodule=datamodule)
    trainer: L.Trainer = parts["trainer"]
    module, loggers = parts["module"], parts["loggers"]
    if cfg.get("init_from") is not None:
        weights = load_weights(module.net, cfg.init_from)  # keys and shapes checked at start-up
        log.info("initialised the network from %s (%s weights)", cfg.init_from, weights or "the")
    start = time.perf_counter()
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        for logger in loggers:
            logger.log_hyperparams(resolved)
        trainer.fit(module, datamodule=parts["datamodule"], ckpt_path=cfg.get("ckpt_path"))
        metrics = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if torch.is_tensor(v) and v.numel() == 1
        }
        last, best = _checkpoint_paths(trainer)
        samples = None
        fs = cfg.get("final_samples") or {}
        if fs.get("enabled", False) and trainer.is_global_zero and not trainer.fast_dev_run:
            samples = _final_samples(cfg, module, trainer, loggers, last, output_dir)
    finally:
        if trainer.is_global_zero:
            finish_wandb(loggers)
    seconds = time.perf_counter() - start
    log.info("finished in %.1f s (%.1f min): metrics %s, last checkpoint %s", seconds,
             seconds / 60, metrics, last)
    return dict(
        metrics=metrics,
        last_ckpt=last,
        best_ckpt=best,
        output_dir=str(output_dir),
        samples=samples,
        seconds=seconds,
        trainer=trainer,
    )


def _final_samples(
    cfg: DictConfig,
    module: L.LightningModule,
    trainer: L.Trainer,
    loggers: list[Logger],
    last: str | None,
    output_dir: Path,
) -> Path | None:
    """Sample the final grid from the last checkpoint's weights (EMA when present).

    Reading the checkpoint rather than the in-memory module also works after ``ddp_spawn``,
    where the parent's module never sees the trained weights. A failure here only warns: a
    finished training run must not be reported as failed because of its preview image.
    """
    fs = cfg.final_samples
    sampler = dict(OmegaConf.to_container(cfg.get("sampler") or {}, resolve=True))
    for knob in ("guidance", "denoise"):
        if fs.get(knob) is not None:
            sampler[knob] = fs[knob]
    try:
        device = trainer.strategy.root_device
        net = TarFlow.from_checkpoint(last, map_location=device) if last else module.net.to(device)
        path = write_sample_grid(
            net,
            output_dir / "samples_final.png",
            sampler,
            per_class=int(fs.per_class),
            max_classes=int(fs.max_classes),
            seed=int(fs.seed),
            space=module.space,
        )
    except Exception as err:  # any failure: the preview is optional
        log.warning(
            "final sample grid failed (%s: %s); training results are unaffected",
            type(err).__name__,
            err,
        )
        return None
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(
                key="samples/grid",
                images=[str(path)],
                step=trainer.global_step,
                caption=["one row per class; final (EMA) weights"],
            )
    log.info("sample grid written to %s", path)
    return path


# The resume that main() found on the command line, for the task it starts (None: none).
_RESUME: Resume | None = None


def _record_run(cfg: DictConfig, resume: Resume | None) -> None:
    """Write this launch's ``.hydra`` records; for a resume also ``resume.yaml`` (the restored
    and the new overrides, and every setting that now differs) and a warning naming the
    changed settings."""
    if resume is None:
        save_records(cfg)
        return
    changes = config_changes(OmegaConf.load(resume.records / "config.yaml"), cfg)
    record = {"checkpoint": resume.checkpoint, "restored_from": str(resume.records),
              "restored_overrides": resume.restored, "new_overrides": resume.new,
              "changes": changes}
    where = save_records(cfg, {"resume.yaml": record})
    log.info("resuming with the overrides recorded in %s plus %s (records: %s)",
             resume.records, resume.new, where)
    if changes:
        log.warning("resumed run differs from its recorded config: %s",
                    describe_changes(changes))


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    """The Hydra task; returns ``val/nll`` (or ``optimized_metric``) for sweepers. In a sweep,
    a failed job is recorded and returns None (:func:`~tarflow.app.sweep_jobs.run_job`)."""
    return run_job(lambda: _job(cfg))


def _job(cfg: DictConfig) -> float | None:
    # A sweep job that ran before (requeued, or its sweep started again): its result, or its
    # last checkpoint to continue from (tarflow/app/launchers.py).
    finished = resume_sweep_job(cfg, RESULT)
    if finished is not None:
        print(f"this sweep job had finished: {cfg.paths.output_dir}/{RESULT}; not trained again")
        return finished.get(cfg.get("optimized_metric", "val/nll"))
    # one_line_errors goes inside the job, so Hydra prints no "Error executing job" line.
    # The log file is held until the start-up checks pass: a refused command writes no train.log.
    with one_line_errors(), job_log(EpochLog.__module__), held_file_log() as release:
        resume = _RESUME

        def start() -> None:
            _record_run(cfg, resume)
            release()

        check_job_types(cfg)  # trainer.max_epochs=abc: one line, not a traceback mid-fit
        if in_multirun():
            check_sweep_job(cfg.trainer)  # one process per job unless SLURM starts the ranks
        name_sweep_job(cfg)  # --multirun: the W&B group is the sweep, the name its values
        result = train(cfg, on_start=start)
        write_result(result, result["output_dir"])  # the sweep summary's row
        print(f"run dir: {result['output_dir']}")
        print(f"last checkpoint: {result['last_ckpt']}")
        metrics = result["metrics"]
        for key in ("val/bpd", "val/nll", "val/latent_nll", "train/loss",
                    *sorted(k for k in metrics if k.startswith("val/fid_"))):
            if key in metrics:
                print(f"{key}: {metrics[key]:.4f}")
        if result["samples"]:
            print(f"sample grid: {result['samples']}")
    return result["metrics"].get(cfg.get("optimized_metric", "val/nll"))


def main() -> float | None:
    """Console entry point (``tarflow-train``); reads the overrides from ``sys.argv``.

    A resume (``ckpt_path=`` a checkpoint whose run directory has ``.hydra`` records) first
    gets the run's recorded overrides put under the command line's own
    (:func:`tarflow.app.runs.resume_argv`), before Hydra composes anything; ``sys.argv`` is
    rewritten so that processes re-launched by DDP see the same command.

    Configuration, data and checkpoint errors print one ``error: ...`` line and exit with
    status 2 (``TARFLOW_DEBUG=1`` shows the traceback).
    """
    global _RESUME
    _RESUME = resume_argv(sys.argv[1:])
    if _RESUME is not None:
        sys.argv = [sys.argv[0], *_RESUME.argv]
    try:
        return cli_main(_hydra_main)
    finally:
        _RESUME = None


if __name__ == "__main__":
    main()
