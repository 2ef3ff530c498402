"""Where an evaluation's results land besides ``eval.json``: a CSV row and a W&B run.

* ``<out>/eval.csv``: one row per evaluation in this folder (metrics, N, sampler, checkpoint,
  reference, extractor weights), columns the union of all rows.
* ``<out>/samples_grid.png``: the first ``log.grid_size`` samples.
* W&B (``log.wandb: true``; offline unless a key or ``WANDB_MODE=online`` says otherwise, as
  for training, :func:`tarflow.lit.wandb_utils.resolve_offline`): a run of job type ``eval``
  named after the checkpoint and sampler (``eval last.ckpt gs_jacobi``), in the W&B group of
  the training run that wrote the checkpoint (its recorded ``logger.wandb.group``, else that
  run's W&B id), with the metrics as summary, the grid as an image and the protocol as config.
  A W&B failure warns; the evaluation's files are already written.
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tarflow.app.runs import records_dirs
from tarflow.files import atomic_write

_METRIC_KEYS = ("inception_score", "inception_score_std", "kid", "kid_std", "precision",
                "recall", "f_score", "val/bpd", "val/latent_nll", "seconds_per_image")


def scalar_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The numbers a dashboard plots: FID@N, IS, KID, precision, recall, bpd, s/image."""
    out = {k: float(v) for k, v in results.items()
           if k.startswith("val/fid_") or k in _METRIC_KEYS}
    for part, seconds in (results.get("seconds") or {}).items():
        out[f"seconds/{part}"] = float(seconds)
    return out


def csv_row(results: dict[str, Any]) -> dict[str, Any]:
    proto = results.get("protocol") or {}
    return {**scalar_metrics(results), "num_samples": results.get("num_samples"),
            "ranks": results.get("ranks"), "sampler": (results.get("sampler_settings") or {})
            .get("name"), "checkpoint": results.get("checkpoint"),
            "samples": results.get("samples"),
            "reference": (proto.get("reference") or {}).get("path"),
            "weights_sha256": (proto.get("features") or {}).get("weights_sha256")}


def append_csv(path: Path, row: dict[str, Any]) -> None:
    """Add ``row`` to the CSV at ``path`` (rewritten whole, atomically; columns: the union)."""
    rows = list(csv.DictReader(io.StringIO(path.read_text()))) if path.is_file() else []
    rows.append({k: "" if v is None else v for k, v in row.items()})
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())


def training_group(ckpt_path: str | None) -> str | None:
    """The W&B group of the run that wrote the checkpoint: its recorded group, else its id."""
    from tarflow.lit.wandb_utils import checkpoint_run_dir, run_id_for

    run = checkpoint_run_dir(ckpt_path)
    if run is None:
        return None
    for records in reversed(records_dirs(run)):
        try:
            group = OmegaConf.select(OmegaConf.load(records / "config.yaml"),
                                     "logger.wandb.group")
        except Exception:  # unreadable records: the id below still groups
            continue
        if group:
            return str(group)
    return run_id_for(run)


def run_name(results: dict[str, Any]) -> str:
    ckpt = results.get("checkpoint")
    what = Path(ckpt).name if ckpt else Path(str(results.get("samples"))).name
    sampler = (results.get("sampler_settings") or {}).get("name") or "samples"
    return f"eval {what} {sampler}"


def log_wandb(cfg: DictConfig, out: Path, results: dict[str, Any], grid: Any) -> None:
    from tarflow.lit.wandb_utils import finish_wandb, run_id_for, wandb_logger

    log = cfg.get("log") or {}
    try:
        logger = wandb_logger(save_dir=str(out), project=str(log.get("wandb_project")
                                                               or "tarflow"),
                              name=run_name(results), id=run_id_for(out),
                              group=training_group(results.get("checkpoint")),
                              job_type="eval", fallback=False)
    except Exception as err:  # W&B is extra: eval.json and eval.csv are written
        warnings.warn(f"W&B: the evaluation was not logged ({type(err).__name__}: {err})",
                      stacklevel=2)
        return
    try:
        logger.experiment.config.update({"protocol": results.get("protocol"),
                                         "sampler": results.get("sampler_settings"),
                                         "checkpoint": results.get("checkpoint"),
                                         "samples": results.get("samples")},
                                        allow_val_change=True)
        logger.log_metrics(scalar_metrics(results))
        for key, value in scalar_metrics(results).items():
            logger.experiment.summary[key] = value
        if grid is not None:
            logger.log_image(key="eval/samples", images=[grid])
    finally:
        finish_wandb([logger])


def log_evaluation(cfg: DictConfig, out: Path, results: dict[str, Any],
                   grid_images: torch.Tensor | None) -> None:
    """CSV row, grid PNG and W&B run of one evaluation (rank 0; see the module doc)."""
    log = cfg.get("log") or {}
    grid = None
    if grid_images is not None and len(grid_images):
        from tarflow.eval.plots import image_grid

        grid = image_grid(grid_images)
        atomic_write(out / "samples_grid.png", lambda handle: grid.save(handle, format="PNG"))
    if log.get("csv", True):
        append_csv(out / "eval.csv", csv_row(results))
    if log.get("wandb", True):
        log_wandb(cfg, out, results, grid)
