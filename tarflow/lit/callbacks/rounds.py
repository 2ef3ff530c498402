"""Pieces of a sampling round that need no collectives: its local result, the dataset lookup,
the ranking table rows and the scalar metrics (with their ``/``-namespaced keys).

Metric keys (``<b>`` is the forward block id, ``<init>`` an initial guess "z" / "zeros"):
    blocks/crm/<b>, blocks/crm_share/<b> (percent), blocks/igm_<init>/<b>
    sampling/iters/<b>      critical-path Jacobi iterations per batch (sequential: N - 1)
    sampling/iters_total    their sum over blocks
    sampling/seconds        sampler wall time of the slowest rank for this round's set
    sampling/seconds_per_image, sampling/images, sampling/fallback
    sampling/speedup_vs_sequential, sampling/max_err_vs_sequential   (compare_sequential > 0)
    sampling/plan_predicted_speedup, sampling/plan_seconds, sampling/plan_reused (schedule: auto)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import Dataset

from tarflow.eval import FeatureStats
from tarflow.eval.plots import image_grid
from tarflow.lit.callbacks.media import RoundMedia
from tarflow.sampling import SEQUENTIAL, BlockRank, Plan, SamplingSchedule
from tarflow.sampling.sample_set import ConvergenceTrace, IterationTally


@dataclass
class RoundResult:
    """One rank's share of a round, before any reduction over ranks.

    Attributes:
        ranking: CRM/IGM rows (identical on every rank) or None.
        schedule: the schedule sampled with.
        tally: this rank's sampler cost.
        grid: (G, C, H, W) the set's first G samples where this rank drew them, zeros elsewhere
            (summing over ranks assembles the grid), or None.
        features: this rank's feature sums (FID rounds) or None.
        trace: the convergence trace of the first batch (rank zero) or None.
        compare: [seconds configured, seconds sequential, samples, max abs error].
        plan: the planner's plan behind ``schedule`` (``schedule: auto``) or None.
    """

    ranking: list[BlockRank] | None
    schedule: SamplingSchedule
    tally: IterationTally
    grid: torch.Tensor | None
    features: FeatureStats | None
    trace: ConvergenceTrace | None
    compare: list[float]
    plan: Plan | None = None


def agree(trainer: L.Trainer, device: torch.device, error: Exception | None, what: str,
          payload: list[float] | None = None) -> list[float]:
    """All-reduce per-rank failure flags (plus a payload summed over ranks) and raise on every
    rank if any rank failed, so no rank waits forever in a collective the failed one never
    joins. Returns the summed payload."""
    world = trainer.world_size
    vec = torch.zeros(world + len(payload or []), dtype=torch.float64, device=device)
    vec[trainer.global_rank] = 0.0 if error is None else 1.0
    vec[world:] = torch.tensor(payload or [], dtype=torch.float64)
    vec = trainer.strategy.reduce(vec, reduce_op="sum")
    if error is not None:
        raise error
    failed = [r for r in range(world) if float(vec[r]) > 0]
    if failed:
        raise RuntimeError(f"SamplingCallback: rank(s) {failed} failed while {what}; their "
                           f"traceback shows why")
    return vec[world:].tolist()


def find_dataset(trainer: L.Trainer, split: str) -> Dataset | None:
    """The trainer's dataset for ``split`` ("train" or "val"), or None.

    Looks at the datamodule's ``<split>_set`` / ``<split>_dataset`` (building it with the
    datamodule's ``setup`` when it is still None, e.g. the train set under ``trainer.validate``),
    then at the dataset of the attached dataloader.
    """
    dm = getattr(trainer, "datamodule", None)
    if dm is not None:
        for attr in (f"{split}_set", f"{split}_dataset"):
            if not hasattr(dm, attr):
                continue
            if getattr(dm, attr) is None and hasattr(dm, "setup"):
                dm.setup("fit" if split == "train" else "validate")
            if getattr(dm, attr) is not None:
                return getattr(dm, attr)
    loaders = trainer.train_dataloader if split == "train" else trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    return getattr(loaders, "dataset", None)


def find_images(trainer: L.Trainer, split: str) -> Dataset | None:
    """The real images of ``split``: the datamodule's ``image_set(split)`` where its batches are
    something else (a latent model's pre-encoded latents), else :func:`find_dataset`."""
    dm = getattr(trainer, "datamodule", None)
    if dm is not None and callable(getattr(dm, "image_set", None)):
        return dm.image_set(split)
    return find_dataset(trainer, split)


def ranking_rows(ranking: list[BlockRank] | None, schedule: SamplingSchedule,
                 tally: IterationTally) -> tuple[list[str], list[list[Any]]]:
    """The ``blocks/ranking`` table: per block its metrics, chosen settings and iterations used.

    Segment and cap columns are strings ("seq", "exact") so each column keeps one type.
    """
    inits = list(ranking[0].igm) if ranking else []
    columns = ["block", "crm", "crm_share", *[f"igm_{i}" for i in inits], "best_init",
               "segments", "max_iters", "init", "iters_used"]
    by_block = {r.block: r for r in ranking or []}
    used = tally.mean_iters()
    rows = []
    for b in range(tally.num_blocks):
        s = schedule.for_block(b)
        r = by_block.get(b)
        metrics = ([r.crm, r.share, *[r.igm[i] for i in inits], r.best_init] if r
                   else [float("nan"), float("nan"), *[float("nan")] * len(inits), ""])
        rows.append([b, *metrics, "seq" if s.segments == SEQUENTIAL else str(s.segments),
                     "exact" if s.max_iters is None else str(s.max_iters), s.init,
                     float(used.get(b, 0.0))])
    return columns, rows


def round_metrics(ranking: list[BlockRank] | None, tally: IterationTally, slowest: float,
                  compare: list[float], max_err: float,
                  plan: Plan | None = None) -> dict[str, float]:
    """Scalar metrics of a round from values already summed over ranks.

    Args:
        ranking: CRM/IGM rows or None.
        tally: sampler cost summed over ranks.
        slowest: the largest per-rank sampler time.
        compare: [seconds configured, seconds sequential, samples] summed over ranks.
        max_err: max abs error vs sequential over ranks.
        plan: the planner's plan (identical on every rank) or None.
    """
    metrics: dict[str, float] = {}
    for r in ranking or []:
        metrics[f"blocks/crm/{r.block}"] = r.crm
        metrics[f"blocks/crm_share/{r.block}"] = r.share
        for init, value in r.igm.items():
            metrics[f"blocks/igm_{init}/{r.block}"] = value
    iters = tally.mean_iters()
    for b, n in iters.items():
        metrics[f"sampling/iters/{b}"] = n
    if iters:  # none for a distilled student: it solves no blocks
        metrics["sampling/iters_total"] = sum(iters.values())
    metrics["sampling/seconds"] = slowest
    metrics["sampling/seconds_per_image"] = tally.seconds_per_image
    metrics["sampling/images"] = float(tally.images)
    metrics["sampling/fallback"] = float(tally.fallback)
    if plan is not None:
        metrics["sampling/plan_predicted_speedup"] = plan.predicted_speedup
        metrics["sampling/plan_seconds"] = plan.planning_seconds if plan.source != "cache" else 0.0
        metrics["sampling/plan_reused"] = float(plan.source == "cache")
    fast, exact, count = compare[:3]
    if count > 0:
        metrics["sampling/speedup_vs_sequential"] = exact / max(fast, 1e-12)
        metrics["sampling/max_err_vs_sequential"] = max_err
    return metrics


def round_media(result: RoundResult, tally: IterationTally, grid: torch.Tensor | None, *,
                step: int, epoch: int, sampler: str, nrow: int | None = None) -> RoundMedia:
    """The round's grid, ranking table, CRM shares, iterations per block and convergence lines
    (log10 residual)."""
    columns, rows = ranking_rows(result.ranking, result.schedule, tally)
    convergence = {}
    tols = set()
    if result.trace is not None:
        for b, (xs, ys) in result.trace.series().items():
            # A residual of exactly 0 (an exact fixed point) would be -inf on a log axis; it is
            # drawn at 1e-16, below float32 round-off (eps^2 ~ 1e-14), where nothing else lands.
            convergence[f"block {b}"] = (xs, [math.log10(max(r, 1e-16)) for r in ys])
            tols.add(result.schedule.for_block(b).tol)
    plan_columns, plan_rows = result.plan.rows() if result.plan is not None else ([], [])
    return RoundMedia(
        step=step, epoch=epoch, grid=None if grid is None else image_grid(grid, nrow),
        caption=f"{sampler}: {result.schedule.describe()}", columns=columns, rows=rows,
        crm_shares={str(r.block): r.share for r in result.ranking or []},
        iters={str(b): n for b, n in tally.mean_iters().items()},
        convergence=convergence, tol=tols.pop() if len(tols) == 1 else None,
        plan_columns=plan_columns, plan_rows=plan_rows)
