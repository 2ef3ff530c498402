"""From sampler settings to the schedule a run samples with: fixed, paper rule or planner.

A fixed schedule is ready as parsed. ``auto:paper`` and ``auto`` need a CRM/IGM ranking of the
blocks on a probe batch (real images as in the paper, or the model's own samples), and ``auto``
then times candidates at the run's batch size (:mod:`tarflow.sampling.planner`); a plan cached
for the same weights, device, batch and settings is reused without ranking. The commands and a
notebook call :func:`choose_schedule`; the validation callback ranks on its own datasets and
calls :meth:`SamplerSettings.schedule_for` directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from tarflow.data import build_dataset
from tarflow.data.subsets import fixed_subset, stack_items
from tarflow.model.space import PixelSpace
from tarflow.model.student import is_student
from tarflow.model.tarflow import TarFlow
from tarflow.sampling.plan import Plan, PlanCache, device_name
from tarflow.sampling.ranking import rank_blocks, ranking_table
from tarflow.sampling.sample import sample
from tarflow.sampling.sample_set import fixed_inputs
from tarflow.sampling.schedule import SamplingSchedule
from tarflow.sampling.settings import SamplerSettings

log = logging.getLogger(__name__)


def probe_batch(net: TarFlow, probe: Mapping[str, Any] | None = None,
                space: PixelSpace | None = None) -> tuple[torch.Tensor, str]:
    """(M, C, H, W) flow inputs for the CRM/IGM ranking, and where they came from.

    Args:
        probe: ``dataset`` (a name of :func:`tarflow.data.build_dataset`; null: the model's own
            sequential samples, slower and only as good as the model), ``root``, ``split``
            (default train), ``size`` (default 256), ``seed`` (default 0), ``dataset_kwargs``.
        space: a latent model's space encodes the real images (default: pixels).
    """
    probe = dict(probe or {})
    space = space or PixelSpace(net.config)
    size, seed = int(probe.get("size") or 256), int(probe.get("seed") or 0)
    param = next(net.parameters())
    if probe.get("dataset"):
        channels, side, _ = space.image_shape
        ds = build_dataset(probe["dataset"], root=probe.get("root"), img_size=side,
                           split=probe.get("split") or "train", channels=channels,
                           flip=False, **(probe.get("dataset_kwargs") or {}))
        images = stack_items(ds, fixed_subset(ds, size, seed))[0]  # (M, C, H, W)
        images = space.flow_inputs(images.to(param.device))
        return images.to(param.device, param.dtype), f"{images.shape[0]} {probe['dataset']} images"
    noise, y = fixed_inputs(net, range(size), seed)
    images, _ = sample(net, noise, y)
    return images, f"{size} sequential samples of the model (probe.dataset is null)"


def choose_schedule(settings: SamplerSettings, net: TarFlow, *, batch_size: int,
                    probe: Mapping[str, Any] | None = None, plan_cache: str | None = None,
                    space: PixelSpace | None = None,
                    report: Callable[[str], None] | None = print,
                    ) -> tuple[SamplingSchedule, Plan | None]:
    """The schedule to sample ``batch_size`` at a time with, and for ``schedule: auto`` the plan
    behind it.

    Args:
        settings: parsed sampler settings (:func:`tarflow.sampling.settings.parse_sampler`).
        probe: where the ranking's probe batch comes from (:func:`probe_batch`).
        plan_cache: a JSON file of plans shared by every command (None: plan afresh).
        report: receives the plan table or the chosen rule's schedule (None: silent).
    """
    if is_student(net):  # a distilled student samples in K steps: nothing to rank or plan
        if report is not None and settings.schedule != "sequential" and settings.is_auto:
            report(f"schedule {settings.schedule!r} does not apply to a distilled student "
                   f"(it samples in K = sampler.steps Euler steps)")
        return SamplingSchedule.sequential(), None
    if not settings.is_auto:
        return settings.resolve(None, net.config.num_patches), None
    cache = PlanCache(plan_cache) if plan_cache else None
    plan = cache.get(settings.plan_key(net, batch_size)) if settings.is_planned and cache else None
    where = "cached plan"
    if plan is None:
        images, where = probe_batch(net, probe, space)
        ranking = rank_blocks(net, images)
        schedule, plan = settings.schedule_for(net, ranking, batch_size, cache=cache)
        log.info("CRM/IGM ranking on %s:\n%s", where, ranking_table(ranking, schedule))
        if plan is None and report is not None:
            report(f"automatic schedule ({settings.schedule}, ranked on {where}): "
                   f"{schedule.describe()}")
    if plan is not None and report is not None:
        device = device_name(next(net.parameters()).device)
        report(f"sampling plan at batch {batch_size} on {device} (prior: {where}"
               f"{'' if cache is None else f'; cache {cache.path}'}):\n{plan.table()}")
    return (plan.schedule if plan is not None else schedule), plan
