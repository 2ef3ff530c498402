"""Distilling a trained TarFlow into a few-step student (``tarflow.model.student``) with Lightning.

:class:`DistillLitModule` is :class:`~tarflow.lit.module.TarFlowLitModule` with another network
and objective: it keeps the optimiser recipe (AdamW, warm-up, cosine), the per-batch generators
(resumable randomness) and the checkpoint record, and trains ``self.net``, a student, by flow
matching on the teacher's pairs ``(z, x)``::

    t = 0 with probability ``p_zero`` (the one-step regression point), else U(0, 1);
    x_t = (1 - t) z + t x;    loss = mean((v(x_t, t) - (x - z))^2).

Validation logs ``val/rel_err`` (K = the student's default steps) and ``val/rel_err_k<K>`` for
every K of ``val_steps``: mean over held-out pairs of ||x^_K - x||^2 / ||x||^2, the student's
relative error to its teacher. The EMA, checkpoint, W&B and sampling callbacks work unchanged:
the sampling callback samples the student in K steps (``sampler.steps``), FID@N and seconds per
image as for a TarFlow. There is no ``val/bpd``: a student has no likelihood.

:class:`DistillDataModule` is the teacher's image datamodule (its images stay the FID reference)
whose train and val sets are pairs: at ``setup`` it writes the pair set it lacks
(:func:`tarflow.sampling.pairs.write_pairs`: rank-sharded over ``RANK`` / ``WORLD_SIZE`` when a
launcher sets them, resumable, refused for another teacher) and reads it
(:class:`tarflow.data.pairs.PairSet`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from tarflow.data.pairs import PairSet
from tarflow.lit.datamodule import TarFlowDataModule
from tarflow.lit.module import OPTIM_DEFAULTS, TarFlowLitModule, _data_identity, _merge, _plain
from tarflow.model.config import TarFlowConfig
from tarflow.model.loading import load_for_sampling
from tarflow.model.space import make_space
from tarflow.model.student import Student, StudentConfig
from tarflow.sampling.choose import choose_schedule
from tarflow.sampling.pairs import missing_shards, write_pairs
from tarflow.sampling.plan import fingerprint
from tarflow.sampling.settings import parse_sampler

PAIRS_DEFAULTS: dict[str, Any] = {
    "dir": None,  # the pair set's folder (shared by runs of the same teacher and sampler)
    "count": 8192,  # training pairs (members [0, count))
    "val_count": 256,  # held-out pairs (members [count, count + val_count))
    "seed": 1_000_000,  # the set's base seed: apart from FID's seeds (0, 1, ...)
    "shard_size": 256,
    "batch_size": 64,  # members per teacher sampler call
    "sampler": None,  # the teacher's sampler dict (conf/sampler form); None: exact sequential
    "wait_seconds": 3600,  # how long a rank waits for the others' shards
}
FLOW_DEFAULTS: dict[str, Any] = {"p_zero": 0.5}


def teacher_record(path: str | Path, sampler: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Where a student comes from: its teacher's path, weights fingerprint, config, data and
    autoencoder, and the sampler (and guidance) its pairs were drawn with."""
    loaded = load_for_sampling(path, device="cpu")
    summary = loaded.summary
    sampler = dict(sampler or {})
    var = loaded.net.var
    prior = None if bool((var == 1).all()) else var.tolist()  # ones in every published model
    return {"path": str(Path(path).resolve()), "fingerprint": fingerprint(loaded.net),
            "tag": summary.config.tag, "config": summary.config.to_dict(),
            "data": summary.data, "autoencoder": summary.autoencoder, "sampler": sampler,
            "guidance": float(sampler.get("guidance") or 0.0), "prior_var": prior}


class DistillLitModule(TarFlowLitModule):
    """Trains ``self.net``, a :class:`~tarflow.model.student.Student` of ``teacher``.

    Args:
        student: :class:`StudentConfig` fields.
        teacher: the teacher checkpoint's path, or the record a checkpoint saved
            (:func:`teacher_record`; ``load_from_checkpoint`` passes it back).
        pairs_sampler: the teacher's sampler the pairs are drawn with (recorded).
        optim: as for the TarFlow module.
        flow: ``p_zero``: probability of training at t = 0 (one-step regression).
        val_steps: the K of the ``val/rel_err_k<K>`` metrics.
        seed, data: as for the TarFlow module.
        model, autoencoder: the teacher's config and autoencoder record; filled in from
            ``teacher`` (accepted so that a checkpoint's hyper-parameters load back).
        noise, label_drop, compile, speed_terms: the TarFlow module's keys (the training
            config passes them): must be null, nothing of them applies to a student.
    """

    def __init__(self, student: Mapping[str, Any], teacher: str | Mapping[str, Any], *,
                 pairs_sampler: Mapping[str, Any] | None = None,
                 optim: Mapping[str, Any] | None = None, flow: Mapping[str, Any] | None = None,
                 val_steps: Sequence[int] = (1, 2, 4, 8), seed: int = 0,
                 data: Mapping[str, Any] | None = None, model: Mapping[str, Any] | None = None,
                 autoencoder: Mapping[str, Any] | None = None, noise: Any = None,
                 label_drop: Any = None, compile: Any = False, speed_terms: Any = None) -> None:
        L.LightningModule.__init__(self)  # not the TarFlow module's: no TarFlow is built
        unused = {"noise": noise, "label_drop": label_drop, "compile": compile,
                  "speed_terms": speed_terms}
        for key, value in unused.items():
            if value not in (None, False):
                raise ValueError(f"module.{key}={value!r} does not apply to a student; null")
        record = (dict(_plain(teacher)) if isinstance(teacher, Mapping)
                  else teacher_record(teacher, _plain(pairs_sampler)))
        self.student_config = StudentConfig.from_dict(_plain(student))
        self.teacher = record
        self.optim_cfg = _merge("optim", optim, OPTIM_DEFAULTS)
        self.flow_cfg = _merge("flow", flow, FLOW_DEFAULTS)
        self.val_steps = sorted({int(k) for k in val_steps} | {self.student_config.steps})
        self.seed = int(seed or 0)
        self.data_identity = _data_identity(data) or record.get("data")
        self.compile_options = None
        self.speed_terms = []
        teacher_cfg = TarFlowConfig(**record["config"])
        self.config = teacher_cfg
        self.space = make_space(teacher_cfg, record.get("autoencoder"))
        ae = None if self.space.record is None else self.space.record.to_dict()
        self.save_hyperparameters({
            "student": self.student_config.to_dict(), "teacher": record,
            "pairs_sampler": record.get("sampler"),
            "optim": {**self.optim_cfg, "betas": list(self.optim_cfg["betas"])},
            "flow": dict(self.flow_cfg), "val_steps": list(self.val_steps), "seed": self.seed,
            "data": self.data_identity, "model": teacher_cfg.to_dict(), "autoencoder": ae})
        self.net = Student(teacher_cfg, self.student_config, record)
        prior = record.get("prior_var")
        if prior is not None:
            self.net.var.copy_(torch.tensor(prior))

    def setup(self, stage: str) -> None:  # nothing to compile
        return None

    def _labels(self, y: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor | None:
        return y if self.config.conditional else None  # the teacher's labels, never dropped

    def training_step(self, batch, batch_idx: int):
        """batch: z, x (B, N, D) tokens and y (B,). Returns the flow-matching loss."""
        z, x, y = batch
        gen = self._generator(0, self.current_epoch, batch_idx, z.device)
        B = z.shape[0]
        t = torch.rand(B, generator=gen, device=z.device, dtype=z.dtype)
        t = torch.where(torch.rand(B, generator=gen, device=z.device) < self.flow_cfg["p_zero"],
                        torch.zeros_like(t), t)
        xt = z + t[:, None, None] * (x - z)  # (B, N, D) on the straight path
        loss = (self.net.velocity(xt, t, self._labels(y, None)) - (x - z)).pow(2).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite distillation loss {loss.item()} at global "
                                     f"step {self.global_step}; lower the learning rate")
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=B)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        """Logs ``val/rel_err`` and ``val/rel_err_k<K>`` (EMA weights; see the module doc)."""
        z, x, y = batch
        kw = dict(on_epoch=True, sync_dist=True, batch_size=z.shape[0])
        labels = self._labels(y, None)
        for K in self.val_steps:
            err = relative_error(self.net.generate(z, labels, steps=K), x).mean()
            self.log(f"val/rel_err_k{K}", err, **kw)
            if K == self.student_config.steps:
                self.log("val/rel_err", err, prog_bar=True, **kw)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The TarFlow module's record, plus what makes this a student checkpoint."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["tarflow"].update(kind="student", student=self.student_config.to_dict(),
                                     teacher=self.teacher)


def relative_error(guess: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) ||guess - target||^2 / ||target||^2 per sample, in float32."""
    diff = (guess.float() - target.float()).pow(2).flatten(1).sum(1)
    return diff / target.float().pow(2).flatten(1).sum(1).clamp_min(1e-12)


class DistillDataModule(TarFlowDataModule):
    """The teacher's data (``image_set``: FID's reference images) with pairs as train and val.

    Args:
        teacher: the teacher checkpoint.
        pairs: ``PAIRS_DEFAULTS`` keys (``dir`` required).
        other arguments: :class:`TarFlowDataModule`'s, describing the teacher's images.
    """

    def __init__(self, name: str, *, teacher: str, pairs: Mapping[str, Any], **kwargs) -> None:
        super().__init__(name, **kwargs)
        self.teacher = str(teacher)
        self.pairs = _merge("distill.pairs", pairs, PAIRS_DEFAULTS)
        if not self.pairs["dir"]:
            raise ValueError("distill.pairs.dir is not set: the folder of the pair set")
        self.pair_seconds = 0.0

    def image_set(self, split: str):
        """Real images of ``split`` (FID's reference), as the teacher's datamodule has them."""
        return self._build(split, self.train_kwargs if split == "train" else self.val_kwargs)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        p = self.pairs
        total = int(p["count"]) + int(p["val_count"])
        t0 = time.perf_counter()
        # Always through the writer: it refuses a folder of another teacher or sampler even
        # when that folder is complete, and draws only what is missing.
        self._write_pairs(total)
        self.pair_seconds = time.perf_counter() - t0
        self.train_set = PairSet(p["dir"], total, range(int(p["count"])))
        self.val_set = PairSet(p["dir"], total, range(int(p["count"]), total))

    def _write_pairs(self, total: int) -> None:
        """This rank's shards, then a wait for the other ranks' (no process group needed)."""
        p = self.pairs
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        loaded = load_for_sampling(self.teacher, device="auto")
        settings = parse_sampler(p["sampler"])
        probe = {"dataset": self.name, "root": self.root}
        schedule, _ = choose_schedule(settings, loaded.net, batch_size=int(p["batch_size"]),
                                      probe=probe, space=loaded.space, report=None)
        write_pairs(loaded.net, p["dir"], count=total, schedule=schedule, knobs=settings.knobs,
                    seed=int(p["seed"]), shard_size=int(p["shard_size"]),
                    batch_size=int(p["batch_size"]), rank=rank, world_size=world,
                    teacher_path=self.teacher)
        deadline = time.monotonic() + float(p["wait_seconds"])
        while missing_shards(p["dir"], total, int(p["shard_size"])):
            if time.monotonic() > deadline:
                raise TimeoutError(f"pair set {p['dir']}: other ranks' shards still missing "
                                   f"after {p['wait_seconds']} s")
            time.sleep(2.0)
