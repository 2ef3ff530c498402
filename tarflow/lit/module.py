"""LightningModule that trains a TarFlow by maximum likelihood (ALGORITHMS.md §2).

The module turns batches into the ring-1 loss ``TarFlow.nll`` and owns the optimiser recipe:
AdamW (β = (0.9, 0.95), weight decay 1e-4), linear warm-up then cosine decay to ``min_lr``,
stepped every optimiser step. Everything it receives is a plain dict / number, and it saves those
with ``save_hyperparameters()``, so ``TarFlowLitModule.load_from_checkpoint(path)`` works in a
notebook without Hydra, and ``TarFlow.from_checkpoint(path)`` finds the architecture under
``hyper_parameters["model"]`` and the network under the ``net.`` prefix.

Which weights a checkpoint holds:
    With an EMA callback in the run (``tarflow.lit.ema.EMA``, a Lightning ``WeightAveraging``;
    on by default through ``callbacks: default``), the checkpoint's ``state_dict`` holds the
    **EMA** weights; the raw training weights sit in ``checkpoint["current_model_state"]`` and
    the averaging counters in ``checkpoint["averaging_state"]`` (resuming restores both).
    Without the callback ``state_dict`` holds the raw weights. Every checkpoint written by this
    module says which in ``checkpoint["tarflow"]["weights"]`` (``"ema"`` or ``"raw"``).
    Validation metrics are computed on the EMA weights too (the callback swaps them in).

Latent models (STARFLOW.md §5): with ``model.autoencoder`` set (or the ``autoencoder``
argument), the network models a frozen autoencoder's scaled latents. ``self.space`` (a
:class:`~tarflow.model.space.LatentSpace`) turns each batch into latents (pre-encoded latents
pass, images are encoded on the device), the noise σ is added in latent space, and validation
logs ``val/latent_nll`` (nats per latent dimension) instead of the pixel ``val/nll`` / ``val/bpd``.
The autoencoder is not part of the module's weights: checkpoints record it (path, scale, shift,
weights fingerprint) under ``hyper_parameters["autoencoder"]`` and ``checkpoint["tarflow"]``.

Randomness: the augmentation noise and label dropout draw from a generator seeded by
``(seed, epoch, batch index, rank)``, not from the global RNG, so a run resumed from a checkpoint
draws exactly the noise an uninterrupted run would have drawn, and validation noise is the same at
every evaluation.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.distributed.fsdp import FullyShardedDataParallel

from tarflow.data import drop_labels, gaussian_noise, uniform_dequantize
from tarflow.model import TarFlow, TarFlowConfig
from tarflow.model.space import make_space
from tarflow.sampling.speed_losses import parse_speed_terms

OPTIM_DEFAULTS: dict[str, Any] = {
    "lr": 1e-4,
    "betas": (0.9, 0.95),
    "weight_decay": 1e-4,
    "eps": 1e-8,
    "warmup_epochs": 1.0,
    "warmup_steps": None,  # when set, wins over warmup_epochs
    "min_lr": 1e-6,
}
NOISE_DEFAULTS: dict[str, Any] = {"type": "gaussian", "std": 0.05}
NOISE_TYPES = ("gaussian", "uniform")
# torch.compile arguments (``compile: true`` takes these as they are).
COMPILE_DEFAULTS: dict[str, Any] = {"backend": "inductor", "mode": None, "fullgraph": False,
                                    "dynamic": None}


def _plain(value: Any) -> Any:
    """Recursively turn mappings / sequences (e.g. OmegaConf containers) into dicts and lists.

    Keeps omegaconf objects out of the saved hyper-parameters without importing omegaconf.
    """
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def _merge(name: str, given: Mapping | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """Defaults updated by ``given``; unknown keys are an error (a typo must not pass silently)."""
    given = _plain(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {name} option(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


def compile_options(value: bool | Mapping | None) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments, or None when compilation is off.

    ``True`` means the defaults; a mapping overrides them (``enabled: false`` inside it turns
    compilation off, so a config can keep its options while switching it off).
    """
    if value is None or value is False:
        return None
    if value is True:
        return dict(COMPILE_DEFAULTS)
    given = _plain(value)
    if not isinstance(given, dict):
        raise ValueError(f"module.compile={value!r}: expected true/false or torch.compile "
                         f"options {sorted(COMPILE_DEFAULTS)}")
    if not given.pop("enabled", True):
        return None
    return _merge("module.compile", given, COMPILE_DEFAULTS)


def _data_identity(data: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Plain ``data`` with an absolute root: the checkpoint may be evaluated from another cwd."""
    if data is None:
        return None
    identity = _plain(data)
    root = identity.get("root")
    if root:
        identity["root"] = os.path.abspath(os.path.expanduser(str(root)))
    return identity


class WarmupCosine:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine from 1 to ``floor``.

    A class rather than a closure so ``LambdaLR.state_dict()`` stores its fields and the
    scheduler pickles into spawned DDP workers.

    Args:
        warmup: warm-up steps (0 = none).
        total: total optimiser steps; None or inf = constant after warm-up.
        floor: final multiplier, ``min_lr / lr``.
    """

    def __init__(self, warmup: int, total: float | None, floor: float) -> None:
        self.warmup = max(0, int(warmup))
        self.total = None if total is None or math.isinf(total) else int(total)
        self.floor = float(floor)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            # (step + 1) so the very first update already moves (lr / warmup, not 0).
            return (step + 1) / self.warmup
        if self.total is None or self.total <= self.warmup:
            return 1.0
        progress = min(1.0, (step - self.warmup) / (self.total - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TarFlowLitModule(L.LightningModule):
    """Trains ``self.net``, a :class:`~tarflow.model.TarFlow`.

    Args:
        model: TarFlowConfig fields (``img_size``, ``patch_size``, ``channels``, ...).
        optim: ``lr``, ``betas``, ``weight_decay``, ``eps``, ``warmup_epochs`` or
            ``warmup_steps``, ``min_lr`` (defaults in ``OPTIM_DEFAULTS``).
        noise: ``type`` ("gaussian": x + std·ε, the generation recipe; "uniform": uniform
            dequantisation, the likelihood recipe) and ``std``.
        label_drop: probability of replacing a label by the null class -1 (conditional models).
        seed: seeds the augmentation generators.
        data: the training data's identity (``name``, ``root``, ``img_size``, ``channels``,
            ``num_classes``, ``dataset_kwargs``), recorded in every checkpoint so that
            ``tarflow-eval`` evaluates against the data the model learnt; a relative ``root``
            is stored as an absolute path.
        compile: ``torch.compile`` the flow blocks for training and validation passes: ``True``
            (inductor, default options) or a mapping of ``backend``, ``mode``, ``fullgraph``,
            ``dynamic`` (``enabled: false`` switches it off). Each ``FlowBlock`` is compiled
            in place (``nn.Module.compile``), not ``TarFlow.forward``: the label range check
            there reads values on the host (a graph break), the blocks share their compiled
            code, and the state-dict keys stay those of the official checkpoints (a
            ``torch.compile``d module would add an ``_orig_mod.`` prefix). Samplers call
            ``FlowBlock.predict`` and stay eager (docs/benchmarks.md, "torch.compile").
        autoencoder: a latent model's ``model.autoencoder`` spec or record (may instead come
            as ``model["autoencoder"]``); None = a pixel model.
        speed_terms: named loss terms for sampling speed, ``{name: {kind, weight, blocks,
            every, prob, k, ...}}`` (``tarflow.sampling.speed_losses``); each adds
            ``weight * term`` to the loss on the steps it runs and logs ``train/<name>``
            (unweighted) and ``train/<name>/<block>``. ``train/loss`` stays the NLL.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        optim: Mapping[str, Any] | None = None,
        noise: Mapping[str, Any] | None = None,
        label_drop: float = 0.1,
        seed: int = 0,
        data: Mapping[str, Any] | None = None,
        compile: bool | Mapping[str, Any] | None = False,
        autoencoder: Mapping[str, Any] | None = None,
        speed_terms: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        model = _plain(model)
        # The Hydra model config carries the autoencoder; the flow's config does not.
        autoencoder = _plain(model.pop("autoencoder", None) or autoencoder)
        known = {f.name for f in dataclasses.fields(TarFlowConfig)}
        if set(model) - known:
            raise ValueError(
                f"unknown model field(s) {sorted(set(model) - known)}; "
                f"TarFlowConfig fields: {sorted(known)}"
            )
        self.config = TarFlowConfig(**model)
        self.optim_cfg = _merge("optim", optim, OPTIM_DEFAULTS)
        self.noise_cfg = _merge("noise", noise, NOISE_DEFAULTS)
        if self.noise_cfg["type"] not in NOISE_TYPES:
            raise ValueError(
                f"noise.type={self.noise_cfg['type']!r}; expected one of {NOISE_TYPES}"
            )
        if not 0.0 <= label_drop <= 1.0:
            raise ValueError(f"label_drop={label_drop} must be in [0, 1]")
        self.label_drop = float(label_drop)
        self.seed = int(seed or 0)
        self.data_identity = _data_identity(data)
        self.compile_options = compile_options(compile)
        self._compiled = False
        self.speed_terms = parse_speed_terms(_plain(speed_terms), self.config, seed=self.seed)
        # Resolved now (scale, shift, geometry, fingerprint), so a missing autoencoder fails at
        # start-up and checkpoints record exactly which one the latents belong to.
        self.space = make_space(self.config, autoencoder)
        record = None if self.space.record is None else self.space.record.to_dict()
        # Store complete, plain values: the full config (so from_checkpoint needs no defaults),
        # and no omegaconf containers (so loading needs no Hydra).
        self.save_hyperparameters(
            {
                "model": self.config.to_dict(),
                "optim": {**self.optim_cfg, "betas": list(self.optim_cfg["betas"])},
                "noise": dict(self.noise_cfg),
                "label_drop": self.label_drop,
                "seed": self.seed,
                "data": self.data_identity,
                "compile": self.compile_options or False,
                "autoencoder": record,
                "speed_terms": {t.name: {k: v for k, v in t.to_dict().items()
                                         if k not in ("name", "seed")}
                                for t in self.speed_terms},
            }
        )
        self.net = TarFlow(self.config)

    def setup(self, stage: str) -> None:
        """Compile the flow blocks when asked (once).

        Here rather than in ``__init__`` or ``configure_model``: Lightning runs the callbacks'
        ``setup`` first, so the EMA callback has already taken its (uncompiled) copy of the
        module, and ``WeightAveraging`` warns about any overridden ``configure_model``.
        """
        if self.compile_options is not None and not self._compiled:
            for block in self.net.blocks:
                block.compile(**self.compile_options)
            self._compiled = True

    # ------------------------------------------------------------------ batch preparation
    def _generator(
        self, stage: int, epoch: int, batch_idx: int, device: torch.device
    ) -> torch.Generator:
        """A fresh generator for one batch, fixed by (seed, stage, epoch, batch, rank)."""
        key = (self.seed, stage, epoch, batch_idx, self.global_rank)
        seed = 0
        for part in key:  # simple polynomial mix; collisions only matter across identical keys
            seed = (seed * 1_000_003 + int(part)) % (2**62)
        return torch.Generator(device=device).manual_seed(seed)

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W) with the training noise applied."""
        if self.noise_cfg["type"] == "uniform":
            return uniform_dequantize(x, generator=gen)
        return gaussian_noise(x, float(self.noise_cfg["std"]), generator=gen)

    def _labels(self, y: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor | None:
        """(B,) labels for the net: None for unconditional models, dropped to -1 when training."""
        if not self.config.conditional:
            return None
        if gen is not None and self.label_drop > 0:
            return drop_labels(y, self.label_drop, generator=gen)
        return y

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        """batch: x (B, C, H, W) in [-1, 1], y (B,) int64. Returns the scalar mean NLL."""
        x, y = batch
        x = self.space.flow_inputs(x)  # latent models: images -> latents (latents pass)
        gen = self._generator(0, self.current_epoch, batch_idx, x.device)
        x = self._augment(x, gen)
        labels = self._labels(y, gen)
        if self.speed_terms:  # the terms need every block's input and output
            out = self.net(x, labels)
            nll = (self.net.prior_nll(out.z) - out.logdet).mean()  # = net.nll(x, labels)
            loss = nll + self._speed_loss(x, labels, out, gen)
        else:
            loss = nll = self.net.nll(x, labels).mean()
        if not torch.isfinite(loss):
            # Stop before the optimiser step so no later checkpoint holds poisoned weights.
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at global step {self.global_step} "
                f"(epoch {self.current_epoch}, batch index {batch_idx}); lower the learning rate, "
                f"enable gradient clipping, or check the data"
            )
        self.log("train/loss", nll, prog_bar=True, batch_size=x.shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=x.shape[0])
        return loss

    def _speed_loss(self, x: torch.Tensor, labels: torch.Tensor | None, out,
                    gen: torch.Generator) -> torch.Tensor | float:
        """Sum of the weighted speed terms due at this step; logs each (unweighted)."""
        total = 0.0
        tokens = self.net.patchify(x)  # (B, N, D), block 0's input
        for term in self.speed_terms:
            if not term.due(self.global_step):
                continue
            values = term.block_values(self.net, tokens, out.block_outputs, labels,
                                       generator=gen)
            value = term.combine(values)
            if value is None:  # e.g. no block above the CRM share this step
                continue
            total = total + term.weight * value
            self.log(f"train/{term.name}", value, batch_size=x.shape[0])
            for b, v in values.items():
                self.log(f"train/{term.name}/{b}", v.detach(), batch_size=x.shape[0])
        return total

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Logs val/nll (training objective, nats/dim) and val/bpd (uniform dequantisation);
        a latent model logs val/latent_nll (the objective per latent dimension) only: bits per
        dimension of 8-bit pixels do not exist for latents (STARFLOW.md §5)."""
        x, y = batch
        x = self.space.flow_inputs(x)
        gen = self._generator(1, 0, batch_idx, x.device)
        labels = self._labels(y, None)
        nll = self.net.nll(self._augment(x, gen), labels).mean()
        kw = dict(on_epoch=True, sync_dist=True, batch_size=x.shape[0])
        if self.space.latent:
            self.log("val/latent_nll", nll, prog_bar=True, **kw)
            return
        bpd = self.net.bits_per_dim(uniform_dequantize(x, generator=gen), labels).mean()
        self.log("val/nll", nll, **kw)
        self.log("val/bpd", bpd, prog_bar=True, **kw)

    # ------------------------------------------------------------------ optimisation
    def _steps_per_epoch(self) -> int:
        trainer = self.trainer
        batches = trainer.num_training_batches
        if not batches or math.isinf(batches):
            return 1
        return max(1, int(batches) // max(1, trainer.accumulate_grad_batches))

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim_cfg
        optimizer = torch.optim.AdamW(
            self.parameters(),
            lr=o["lr"],
            betas=tuple(o["betas"]),
            weight_decay=o["weight_decay"],
            eps=o["eps"],
        )
        total = self.trainer.estimated_stepping_batches
        if o["warmup_steps"] is not None:
            warmup = int(o["warmup_steps"])
        else:
            warmup = round(float(o["warmup_epochs"]) * self._steps_per_epoch())
        schedule = WarmupCosine(warmup, total, o["min_lr"] / o["lr"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, except under FSDP: each rank holds a shard of the gradients,
        so only FSDP's own ``clip_grad_norm_`` sees the global norm (Lightning's FSDP
        precision plugin refuses norm clipping)."""
        model = self.trainer.strategy.model
        if (isinstance(model, FullyShardedDataParallel) and gradient_clip_val
                and gradient_clip_algorithm in (None, "norm")):
            model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adds ``checkpoint["tarflow"]``: which weights ``state_dict`` holds, and the config.

        Lightning runs the callbacks' hooks before this one, so an averaging callback has
        already moved the raw weights to ``current_model_state`` when we look.
        """
        logger = self.logger
        checkpoint["tarflow"] = {
            "weights": "ema" if "current_model_state" in checkpoint else "raw",
            "raw_weights_key": (
                "current_model_state" if "current_model_state" in checkpoint else "state_dict"
            ),
            "config": self.config.to_dict(),
            "tag": self.config.tag,
            "run_id": None if logger is None else str(logger.version),
            "data": self.data_identity,
            "autoencoder": None if self.space.record is None else self.space.record.to_dict(),
        }
