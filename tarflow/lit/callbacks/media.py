"""Media of a sampling round (grid, tables, CRM and iteration bars, convergence lines) to every
logger.

W&B gets native, interactive objects through the Lightning ``WandbLogger`` (``log_image``,
``log_table``, and ``log_metrics`` with ``wandb.plot.bar`` / ``wandb.plot.line_series`` charts
built on ``wandb.Table``). Any other logger with a ``log_dir`` (CSV, TensorBoard) gets the same
content as files under ``<log_dir>/media/``: the tables as CSV, the charts as matplotlib PNGs
(:mod:`tarflow.eval.plots`), so a run without W&B still keeps its pictures next to
``metrics.csv``. Called on global rank zero only.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from PIL import Image

from tarflow.eval.plots import bar_chart, convergence_chart

GRID_KEY = "samples/grid"
TABLE_KEY = "blocks/ranking"
CRM_CHART_KEY = "blocks/crm_chart"
ITERS_CHART_KEY = "sampling/iters_chart"
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
        iters: per block label, the Jacobi iterations it used (critical path, mean per batch).
        convergence: per block label, (iterations, log10 residual) of the traced batch.
        tol: the stopping tolerance of every traced block (None when they differ).
        plan_columns, plan_rows: the planner's table (block, candidate, measured cost, chosen).
    """

    step: int
    epoch: int
    grid: Image.Image | None = None
    caption: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    crm_shares: dict[str, float] = field(default_factory=dict)
    iters: dict[str, float] = field(default_factory=dict)
    convergence: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    tol: float | None = None
    plan_columns: list[str] = field(default_factory=list)
    plan_rows: list[list[Any]] = field(default_factory=list)


# A block the schedule runs sequentially counts its N - 1 steps as iterations (the same number
# of dependent network passes), so an all-sequential plan shows N - 1 everywhere.
ITERS_TITLE = "Iterations per block, critical path (sequential block: N-1 steps)"


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
    if media.iters:
        table = wandb.Table(columns=["block", "iterations"],
                            data=[[k, v] for k, v in media.iters.items()])
        charts[ITERS_CHART_KEY] = wandb.plot.bar(table, "block", "iterations",
                                                 title=ITERS_TITLE)
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
    bars = ((CRM_CHART_KEY, media.crm_shares, "CRM share per block", "CRM share (%)", False),
            (ITERS_CHART_KEY, media.iters, ITERS_TITLE, "iterations per batch", True))
    for key, values, title, ylabel, counts in bars:
        if values:
            path = out / f"{_file_stem(key, media)}.png"
            bar_chart(list(values), list(values.values()), title=title, xlabel="block",
                      ylabel=ylabel, fmt="{:.3g}" if counts else "{:.1f}",
                      integer=counts).save(path)
            written.append(path)
    if media.convergence:
        path = out / f"{_file_stem(CONVERGENCE_KEY, media)}.png"
        convergence_chart(media.convergence, tol=media.tol,
                          title="Jacobi convergence (first batch, worst sample)").save(path)
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
