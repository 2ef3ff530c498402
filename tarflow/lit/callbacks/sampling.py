"""Validation-time sampling: CRM/IGM block ranking, GS-Jacobi samples, FID@N, speed, media.

Every ``every_n_epochs`` validations (never during the sanity check) :class:`SamplingCallback`

1. ranks the blocks on a fixed probe batch of real images (CRM, CRM share, IGM per initial guess)
   and, for ``schedule: auto``, asks the planner (rank zero measures, every rank receives the
   plan). Plans are cached in ``plan_cache`` keyed by the architecture, device, batch and
   settings, and reused across rounds until the CRM shares move materially (a block's share by
   more than 10 points, or a change in which blocks are tough: ``ranking_moved``), so a run pays
   for planning once or twice, not every round;
2. samples a fixed set whose member ``i`` always starts from seed ``seed + i``, sharded over DDP
   ranks by index (the same set for any world size), with the configured sampler;
3. on FID rounds, streams the samples through the feature extractor, adds the per-rank feature
   sums over ranks and computes ``val/fid_<N>`` against the cached reference statistics;
4. optionally re-samples a small subset sequentially: speed-up and max error vs sequential;
5. logs metrics on every rank with ``sync_dist=True``, and media from rank zero (see
   :mod:`tarflow.lit.callbacks.media`).

Latent models (``pl_module.space`` is a :class:`~tarflow.model.space.LatentSpace`): the probe
batch is encoded (or read as latents), the set is sampled in latent space with the same sampler,
and every batch is decoded to images in chunks before it reaches the grid and the feature
extractor; the reference statistics stay those of the real images (``image_set`` of the
datamodule), so FID compares decoded samples with real pixels. ``compare_sequential`` compares
latents.

It must see the EMA weights. Lightning calls callback hooks in list order: ``WeightAveraging``
swaps the averaged weights in at ``on_validation_epoch_start`` and back at
``on_validation_epoch_end``, so this callback's ``on_validation_epoch_end`` runs on the averaged
weights only when it is listed *before* the averaging callback; :meth:`setup` enforces that.

Failure handling under DDP: the work is split into local phases with no collectives inside; after
each one every rank contributes a failure flag to an all-reduce and all ranks raise together, so
an exception on one rank never leaves the others waiting in a collective.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from tarflow.data.subsets import fixed_subset, stack_items
from tarflow.eval import FeatureStats, ReferenceStats, frechet_distance
from tarflow.eval.fid_at_n import draw_set, feature_extractor
from tarflow.lit.callbacks.media import log_media
from tarflow.lit.callbacks.reference import logged_reference_stats
from tarflow.lit.callbacks.rounds import (
    RoundResult,
    agree,
    find_dataset,
    find_images,
    round_media,
    round_metrics,
)
from tarflow.lit.fsdp import sampling_network
from tarflow.model import TarFlow
from tarflow.model.space import PixelSpace
from tarflow.model.student import is_student
from tarflow.sampling import Plan, PlanCache, SamplingSchedule, rank_blocks, ranking_table
from tarflow.sampling.sample_set import (
    ConvergenceTrace,
    IterationTally,
    SampledBatch,
    compare_with_sequential,
    save_shard,
    shard_indices,
)
from tarflow.sampling.settings import parse_sampler


def _plain(value: Any) -> Any:
    """Mappings (e.g. an OmegaConf node) to dicts, recursively, without importing omegaconf."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class SamplingCallback(Callback):
    """Sample, rank, measure and log during validation (see the module docstring).

    Args:
        sampler: a ``tarflow/conf/sampler/*.yaml`` dict (schedule, tol, init, guidance, ...).
        every_n_epochs: run a sampling round every n-th validation.
        num_samples: N of ``val/fid_<N>``: the size of the fixed sample set on FID rounds.
        fid_every_n_epochs: compute FID every n-th validation (0 = never); FID rounds sample N
            images, other rounds only ``grid_size``.
        fid_on_last_epoch: also compute FID at the validation of the last epoch.
        batch_size: samples per sampler call and rank.
        seed: base seed of the sample set (member i uses seed + i).
        grid_size: samples shown in the grid (the first members of the set); 0 = no grid.
        grid_nrow: grid columns (None: about square).
        probe_size: real images for the CRM/IGM ranking (the paper uses ~1000); 0 = no ranking.
        probe_split: dataset split of the probe batch ("val" or "train").
        rank_norm: matrix norm of CRM/IGM ("spectral", "1", "fro").
        compare_sequential: also sample this many members sequentially (0 = off).
        fid_stats_path: cache file of the reference statistics; None disables FID.
        reference_split: dataset split of the reference images.
        reference_size: images in the reference statistics.
        reference_seed: seed of the reference subset.
        inception_weights: Inception weights file (None: the default location).
        fid_batch_size: images per Inception forward.
        extractor: a feature extractor to use instead of Inception (tests inject a small one).
        samples_dir: if set, each rank writes its shard (indices, labels, float images) to
            ``<samples_dir>/round<k>_rank<r>.npz``.
        plan_cache: JSON file of the planner's plans (``schedule: auto``); None keeps them in
            memory for this run only.
    """

    def __init__(self, sampler: Mapping[str, Any] | None = None, *, every_n_epochs: int = 1,
                 num_samples: int = 100, fid_every_n_epochs: int = 1,
                 fid_on_last_epoch: bool = True, batch_size: int = 64, seed: int = 0,
                 grid_size: int = 64, grid_nrow: int | None = None, probe_size: int = 256,
                 probe_split: str = "val", rank_norm: str = "spectral",
                 compare_sequential: int = 0, fid_stats_path: str | None = None,
                 reference_split: str = "train", reference_size: int = 500,
                 reference_seed: int = 0, inception_weights: str | None = None,
                 fid_batch_size: int = 64, extractor: Callable | None = None,
                 samples_dir: str | None = None, plan_cache: str | None = None) -> None:
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs} must be >= 1")
        if num_samples < 1 or batch_size < 1:
            raise ValueError("num_samples and batch_size must be >= 1")
        self.settings = parse_sampler(_plain(sampler))
        self.sampler_record = dict(_plain(sampler) or {})  # in checkpoints: tarflow-eval's default
        self.every_n_epochs = int(every_n_epochs)
        self.num_samples = int(num_samples)
        self.fid_every_n_epochs = int(fid_every_n_epochs or 0)
        self.fid_on_last_epoch = bool(fid_on_last_epoch)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.grid_size, self.grid_nrow = max(0, int(grid_size)), grid_nrow
        self.probe_size, self.probe_split, self.rank_norm = int(probe_size), probe_split, rank_norm
        self.compare_sequential = max(0, int(compare_sequential))
        self.fid_stats_path = fid_stats_path
        self.reference_split, self.reference_size = reference_split, int(reference_size)
        self.reference_seed = int(reference_seed)
        self.inception_weights, self.fid_batch_size = inception_weights, int(fid_batch_size)
        self.extractor = extractor
        self.samples_dir = samples_dir
        self.plan_cache = PlanCache(plan_cache)
        self.validations = 0  # non-sanity validations seen (saved in checkpoints)
        self._probe: torch.Tensor | None = None
        self._reference: ReferenceStats | None = None
        self._round_net: TarFlow | None = None  # the network a round samples (FSDP: a copy)
        self._space: PixelSpace | None = None  # the module's pixel or latent space

    @property
    def fid_key(self) -> str:
        return f"val/fid_{self.num_samples}"

    @property
    def fid_enabled(self) -> bool:
        return self.fid_stats_path is not None and (self.fid_every_n_epochs > 0
                                                    or self.fid_on_last_epoch)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the callback order (EMA after us), the module and the sample count."""
        callbacks = list(trainer.callbacks)
        mine = next(k for k, cb in enumerate(callbacks) if cb is self)
        for k, cb in enumerate(callbacks[:mine]):
            if isinstance(cb, WeightAveraging):
                raise RuntimeError(
                    f"SamplingCallback is listed after {type(cb).__name__} (callback #{k}); it "
                    f"must come BEFORE the weight-averaging callback, whose "
                    f"on_validation_epoch_end swaps the raw weights back in before later "
                    f"callbacks run, so sampling would not use the EMA weights. Put `sampling` "
                    f"before `ema` in the callbacks list.")
        net = getattr(pl_module, "net", None)
        if not isinstance(net, TarFlow) and not is_student(net):
            raise TypeError(f"SamplingCallback needs `pl_module.net` to be a TarFlow or a "
                            f"distilled student; {type(pl_module).__name__} has neither")
        if is_student(net) and (self.settings.is_auto or self.compare_sequential):
            raise ValueError("a distilled student has no schedule to plan and no sequential "
                             "loop: set the sampler's schedule to sequential (steps: K) and "
                             "callbacks.sampling.compare_sequential=0")
        if is_student(net):
            self.probe_size = 0  # no blocks to rank
        elif not self.settings.is_auto:  # a schedule naming block 7 of a 4-block model: fail now
            cfg = pl_module.net.config
            self.settings.schedule.validate(cfg.num_blocks, cfg.num_patches)
        if self.fid_enabled and self.num_samples < max(2, trainer.world_size):
            raise ValueError(f"num_samples={self.num_samples} must be at least 2 and at least "
                             f"the world size {trainer.world_size} for FID")

    def state_dict(self) -> dict[str, Any]:
        # The sampler is recorded for tarflow-eval, which samples as validation did by default.
        return {"validations": self.validations, "sampler": self.sampler_record}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        # max_epochs is -1 or None when a run is bounded by steps: then no epoch is "the last".
        last = ((trainer.max_epochs or 0) > 0 and trainer.state.fn == "fit"
                and trainer.current_epoch + 1 >= trainer.max_epochs)
        due, fid_due = self.round_due(self.validations, last=last)
        if not due:
            return
        # Validation runs under inference mode; the cached extractor and probe batch outlive
        # this hook, so build them (and everything else) as normal tensors.
        # Under FSDP the round samples a gathered, unwrapped copy (see sampling_network).
        with (torch.inference_mode(False), torch.no_grad(),
              sampling_network(trainer, pl_module.net) as net):
            self._round_net = net
            try:
                self.run_round(trainer, pl_module, fid_due=fid_due)
            finally:
                self._round_net = None

    def round_due(self, validation: int, *, last: bool = False) -> tuple[bool, bool]:
        """(sample this validation?, with FID?) for the ``validation``-th one (from 1)."""
        fid = self.fid_stats_path is not None and (
            (self.fid_every_n_epochs > 0 and validation % self.fid_every_n_epochs == 0)
            or (self.fid_on_last_epoch and last))
        return fid or validation % self.every_n_epochs == 0, fid

    # ------------------------------------------------------------------ one round
    def run_round(self, trainer: L.Trainer, pl_module: L.LightningModule, *,
                  fid_due: bool) -> dict[str, float]:
        """Sample, measure, reduce over ranks and log; returns the logged metrics."""
        net: TarFlow = self._round_net or pl_module.net
        # Pixels, or a latent model's autoencoder: decides what real data and samples look like.
        self._space = getattr(pl_module, "space", None) or PixelSpace(net.config)
        device = pl_module.device
        total = self.num_samples if fid_due else max(1, min(self.grid_size, self.num_samples))
        ranking, schedule, plan, error = None, None, None, None
        try:  # phase 0: ranking on every rank; the schedule (planner) on rank zero only
            ranking = self._rank(trainer, net)
            if trainer.is_global_zero or not self.settings.is_planned:
                schedule, plan = self.settings.schedule_for(
                    net, ranking, self.batch_size, cache=self.plan_cache, weights=False,
                    seed=self.seed, timer=self._planner_timer(trainer))
        except Exception as err:
            error = err
        agree(trainer, device, error, "choosing the sampling schedule")
        if self.settings.is_planned:  # every rank samples with rank zero's measured plan
            schedule, plan = trainer.strategy.broadcast((schedule, plan), src=0)
        result, error = None, None
        try:  # phase 1: local work only, no collectives
            result = self._local_round(trainer, net, total, fid_due, ranking, schedule, plan)
        except Exception as err:  # reported to every rank below
            error = err
        agree(trainer, device, error, "sampling")
        assert result is not None
        strategy = trainer.strategy
        # Phase 2: sums over ranks (the same calls, in the same order, on every rank).
        tally = IterationTally.from_tensor(
            strategy.reduce(result.tally.to_tensor(device), reduce_op="sum"))
        slowest = float(strategy.reduce(
            torch.tensor([result.tally.seconds], dtype=torch.float64, device=device),
            reduce_op="max"))
        compare = strategy.reduce(torch.tensor(result.compare[:3], dtype=torch.float64,
                                               device=device), reduce_op="sum").tolist()
        max_err = float(strategy.reduce(torch.tensor([result.compare[3]], dtype=torch.float64,
                                                     device=device), reduce_op="max"))
        grid = None
        if result.grid is not None:
            grid = strategy.reduce(result.grid, reduce_op="sum")
        if result.features is not None:
            state = {k: strategy.reduce(v.clone(), reduce_op="sum")
                     for k, v in result.features.state.items()}
            result.features = FeatureStats.from_state(state)
        # Phase 3: FID and media on rank zero; the FID value travels with the failure flag.
        fid, error = 0.0, None
        if trainer.is_global_zero:
            try:
                if fid_due:
                    ref_mu, ref_sigma = self._reference.mean_cov()
                    mu, sigma = result.features.mean_cov()
                    fid = frechet_distance(mu, sigma, ref_mu, ref_sigma)
                self._log_media(trainer, result, tally, grid)
            except Exception as err:
                error = err
        fid = agree(trainer, device, error, "computing FID / logging media", [fid])[0]
        metrics = round_metrics(result.ranking, tally, slowest, compare, max_err, plan)
        if fid_due:
            metrics[self.fid_key] = fid
        self._check_plan(trainer, plan, metrics.get("sampling/speedup_vs_sequential"))
        # Phase 4: identical values on every rank; sync_dist keeps Lightning's bookkeeping
        # consistent (the mean of equal numbers is the number).
        for key, value in metrics.items():
            pl_module.log(key, float(value), sync_dist=True)
        return metrics

    def _local_round(self, trainer: L.Trainer, net: TarFlow, total: int, fid_due: bool,
                     ranking, schedule: SamplingSchedule, plan: Plan | None) -> RoundResult:
        device = next(net.parameters()).device
        extractor = self._extractor(device) if fid_due else None
        if fid_due and trainer.is_global_zero and self._reference is None:
            self._reference = self._load_reference(trainer, extractor, device)
        shard = shard_indices(total, trainer.global_rank, trainer.world_size)
        grid_n = min(self.grid_size, total)
        grid = (torch.zeros(grid_n, *self._space.image_shape, device=device)
                if grid_n else None)
        trace = ConvergenceTrace() if trainer.is_global_zero else None
        kept: list[SampledBatch] = []  # only with samples_dir

        def keep(batch: SampledBatch, images: torch.Tensor) -> None:
            for j, i in enumerate(batch.indices):
                if i < grid_n:  # the grid shows the set's first members, whoever drew them
                    grid[i] = images[j]
            if self.samples_dir:
                kept.append(SampledBatch(batch.indices, batch.labels, images.cpu(), batch.stats))

        run = draw_set(net, shard, schedule, seed=self.seed, batch_size=self.batch_size,
                         knobs=self.settings.knobs, space=self._space, extractor=extractor,
                         trace=trace, on_batch=keep)
        if self.samples_dir:
            save_shard(Path(self.samples_dir) / f"round{self.validations:04d}_rank"
                       f"{trainer.global_rank}.npz", kept, schedule=schedule.describe())
        return RoundResult(ranking, schedule, run.tally, grid, run.features, trace,
                           self._compare(net, schedule, shard), plan)

    def _compare(self, net: TarFlow, schedule: SamplingSchedule,
                 shard: list[int]) -> list[float]:
        """[seconds configured, seconds sequential, samples, max abs error] on this rank's
        members below ``compare_sequential`` (see :func:`compare_with_sequential`)."""
        subset = [i for i in shard if i < self.compare_sequential]
        return compare_with_sequential(net, schedule, subset, self.seed, self.settings.knobs)

    # ------------------------------------------------------------------ helpers
    def _check_plan(self, trainer: L.Trainer, plan: Plan | None, measured: float | None) -> None:
        """Drop a cached plan whose measured speed-up falls well short of its prediction
        (below 0.8x the predicted one, and below 1): it was timed while something else loaded
        the machine, or the weights moved since. The next round plans again."""
        if plan is None or measured is None or not trainer.is_global_zero:
            return
        if measured < min(1.0, 0.8 * plan.predicted_speedup):
            self.plan_cache.drop(plan.key)
            rank_zero_warn(f"sampling plan {plan.schedule.describe()} measured "
                           f"{measured:.2f}x sequential against {plan.predicted_speedup:.2f}x "
                           f"predicted; it will be planned again at the next round")

    def _planner_timer(self, trainer: L.Trainer):
        """A cost function replacing the planner's wall-clock timing, or None (the default).
        An extension point for tests that need a plan they can predict."""
        return None

    def _rank(self, trainer: L.Trainer, net: TarFlow):
        """CRM/IGM ranking on the fixed probe batch, or None when there is no probe data."""
        if self.probe_size <= 0 and not self.settings.is_auto:
            return None
        if self._probe is None:
            ds = find_dataset(trainer, self.probe_split)
            if ds is None:
                if self.settings.is_auto:
                    raise ValueError(f"schedule 'auto' needs probe images, but the trainer has "
                                     f"no {self.probe_split!r} dataset")
                rank_zero_warn(f"SamplingCallback: no {self.probe_split!r} dataset; skipping "
                               f"the CRM/IGM ranking")
                self.probe_size = 0
                return None
            idx = fixed_subset(ds, max(self.probe_size, 2), seed=self.seed)
            device = next(net.parameters()).device
            # Latent models rank on latents: read as such, or the images encoded once here.
            self._probe = self._space.flow_inputs(stack_items(ds, idx)[0].to(device))
        param = next(net.parameters())
        return rank_blocks(net, self._probe.to(param.device, param.dtype), norm=self.rank_norm)

    def _extractor(self, device: torch.device) -> Callable:
        self.extractor = feature_extractor(self.extractor, weights=self.inception_weights,
                                           batch_size=self.fid_batch_size, device=device)
        return self.extractor

    def _load_reference(self, trainer: L.Trainer, extractor: Callable,
                        device: torch.device) -> ReferenceStats:
        ds = find_images(trainer, self.reference_split)  # real images, also for latent models
        if ds is None:
            raise ValueError(f"FID needs reference images, but the trainer has no "
                             f"{self.reference_split!r} dataset (set reference_split)")
        return logged_reference_stats(self.fid_stats_path, ds, extractor, trainer.loggers,
                                      split=self.reference_split, count=self.reference_size,
                                      seed=self.reference_seed, batch_size=self.fid_batch_size,
                                      device=device)

    def _log_media(self, trainer: L.Trainer, result: RoundResult, tally: IterationTally,
                   grid: torch.Tensor | None) -> None:
        if result.ranking is not None:
            rank_zero_info(f"block ranking (epoch {trainer.current_epoch}):\n"
                           f"{ranking_table(result.ranking, result.schedule)}\n"
                           f"schedule: {result.schedule.describe()}")
        if result.plan is not None:
            rank_zero_info(f"sampling plan at batch {self.batch_size} (epoch "
                           f"{trainer.current_epoch}):\n{result.plan.table()}")
        media = round_media(result, tally, grid, step=trainer.global_step,
                            epoch=trainer.current_epoch, sampler=self.settings.name,
                            nrow=self.grid_nrow)
        log_media(trainer.loggers, media, fallback_dir=trainer.default_root_dir)
