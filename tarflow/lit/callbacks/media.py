"""Media of a sampling round (grid, ranking table, CRM bars, convergence lines) to every logger.

W&B gets native objects through the Lightning ``WandbLogger`` (``log_image``, ``log_table``,
``log_metrics`` with ``wandb.plot`` charts). Any other logger with a ``log_dir`` (CSV,
TensorBoard) gets the same content as PNG / CSV files under ``<log_dir>/media/``, so a run without
W&B still keeps its pictures next to ``metrics.csv``. Called on global rank zero only.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from PIL import Image

from tarflow.lit.callbacks.plots import bar_chart, line_chart

GRID_KEY = "samples/grid"
TABLE_KEY = "blocks/ranking"
CRM_CHART_KEY = "blocks/crm_chart"
CONVERGENCE_KEY = "sampling/convergence"
PLAN_KEY = "sampling/plan"


@dataclass
class RoundMedia:
    """What one sampling round shows besides scalar metrics.

    Attributes:
        step: trainer global step (the x axis of every logger).
        epoch: trainer epoch (file names only).
        grid: the sample grid, or None.
        caption: a line under the grid (sampler, schedule).
        columns: ranking table header; rows: one list per block.
        crm_shares: per block label, its CRM share in percent.
        convergence: per block label, (iterations, log10 residual) of the traced batch.
        plan_columns, plan_rows: the planner's table (block, candidate, measured cost, chosen).
    """

    step: int
    epoch: int
    grid: Image.Image | None = None
    caption: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    crm_shares: dict[str, float] = field(default_factory=dict)
    convergence: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    plan_columns: list[str] = field(default_factory=list)
    plan_rows: list[list[Any]] = field(default_factory=list)


def _log_wandb(logger: WandbLogger, media: RoundMedia) -> None:
    import wandb  # the Lightning logger already needs it; imported late to keep startup light

    if media.grid is not None:
        logger.log_image(GRID_KEY, [media.grid], step=media.step, caption=[media.caption])
    if media.rows:
        logger.log_table(TABLE_KEY, columns=media.columns, data=media.rows, step=media.step)
    if media.plan_rows:
        logger.log_table(PLAN_KEY, columns=media.plan_columns, data=media.plan_rows,
                         step=media.step)
    charts: dict[str, Any] = {}
    if media.crm_shares:
        table = wandb.Table(columns=["block", "crm_share"],
                            data=[[k, v] for k, v in media.crm_shares.items()])
        charts[CRM_CHART_KEY] = wandb.plot.bar(table, "block", "crm_share",
                                               title="CRM share per block (%)")
    if media.convergence:
        names = list(media.convergence)
        charts[CONVERGENCE_KEY] = wandb.plot.line_series(
            xs=[list(media.convergence[n][0]) for n in names],
            ys=[list(media.convergence[n][1]) for n in names],
            keys=names, title="log10 relative residual per Jacobi iteration",
            xname="iteration")
    if charts:
        logger.log_metrics(charts, step=media.step)


def _file_stem(key: str, media: RoundMedia) -> str:
    return f"{key.replace('/', '_')}_epoch{media.epoch:03d}_step{media.step:07d}"


def write_media_files(directory: str | Path, media: RoundMedia) -> list[Path]:
    """Write the round's media as PNG / CSV files into ``directory``; returns their paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if media.grid is not None:
        path = out / f"{_file_stem(GRID_KEY, media)}.png"
        media.grid.save(path)
        written.append(path)
    for key, columns, rows in ((TABLE_KEY, media.columns, media.rows),
                               (PLAN_KEY, media.plan_columns, media.plan_rows)):
        if not rows:
            continue
        path = out / f"{_file_stem(key, media)}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows(rows)
        written.append(path)
    if media.crm_shares:
        path = out / f"{_file_stem(CRM_CHART_KEY, media)}.png"
        bar_chart(list(media.crm_shares), list(media.crm_shares.values()),
                  title="CRM share per block (%)", xlabel="block", ylabel="share %").save(path)
        written.append(path)
    if media.convergence:
        path = out / f"{_file_stem(CONVERGENCE_KEY, media)}.png"
        line_chart(media.convergence, title="Jacobi convergence (traced batch)",
                   xlabel="iteration", ylabel="log10 residual").save(path)
        written.append(path)
    return written


def log_media(loggers: Sequence[Logger], media: RoundMedia,
              fallback_dir: str | Path | None = None) -> list[Path]:
    """Send ``media`` to every logger; file-based ones (and ``fallback_dir`` when there is no
    logger at all) get files under ``<dir>/media``.

    Returns:
        The files written (W&B's own media files are not listed).
    """
    written: list[Path] = []
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            _log_wandb(logger, media)
        elif getattr(logger, "log_dir", None):
            written += write_media_files(Path(logger.log_dir) / "media", media)
    if not loggers and fallback_dir is not None:
        written += write_media_files(Path(fallback_dir) / "media", media)
    return written
