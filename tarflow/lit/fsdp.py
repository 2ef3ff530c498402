"""Sharded data-parallel training (``trainer=fsdp``): Lightning's FSDP strategy, set up for TarFlow.

:class:`TarFlowFSDPStrategy` is Lightning's ``FSDPStrategy`` with TarFlow's defaults:

* one FSDP unit per transformer layer (``auto_wrap_policy={TransformerLayer}``): a layer's
  parameters are gathered just before it runs and freed after, so peak memory holds one layer in
  full plus the shards; everything else (embeddings, ``proj_in``/``proj_out``, the prior) sits in
  the root unit;
* ``state_dict_type="sharded"``: each rank writes its own shard into a checkpoint *directory*
  (``last.ckpt/``: ``meta.pt``, ``.metadata``, ``__<rank>_0.distcp``), so no rank ever holds
  the full optimiser state; ``TarFlow.from_checkpoint``, ``tarflow-sample``/``-eval`` and
  ``tarflow-export`` read such a directory directly (:mod:`tarflow.model.sharded`). Written
  into a temporary directory first and renamed into place, so a crash during a save leaves the
  previous checkpoint whole (as :class:`~tarflow.lit.checkpoint_io.AtomicCheckpointIO` does for
  files);
* ``precision: bf16-mixed`` computes in bf16 but keeps gradient reduction and buffers in
  float32 (Lightning's default for FSDP reduces gradients in bf16 too): the loss is a
  likelihood averaged over many dimensions and ranks, where bf16 sums lose digits.

It also runs on CPU processes over gloo, which Lightning refuses for FSDP (its accelerator check
tests the exact class, and it passes no device to FSDP for CPU, which torch then rejects). Our
tests use that; nothing on the GPU path differs from Lightning's.

EMA (Lightning's ``WeightAveraging``) keeps a full, unsharded copy of the module and averages it
parameter by parameter against the sharded ones, which fails under FSDP: runs with this strategy
must drop the ``ema`` callback (``tarflow-train`` refuses the combination at start-up).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
from torch.nn import Module

from tarflow.files import fsync_dir
from tarflow.model import TarFlow
from tarflow.model.layers import TransformerLayer

FSDP_PREFIX = "_fsdp_wrapped_module."


class TarFlowFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` wrapping each ``TransformerLayer``, with sharded checkpoints.

    Args:
        auto_wrap_policy: FSDP units; default one per ``TransformerLayer``.
        state_dict_type: "sharded" (default: a directory of per-rank shards) or "full" (rank 0
            gathers everything into one file).
        **kwargs: everything else of Lightning's ``FSDPStrategy`` (``sharding_strategy``,
            ``activation_checkpointing_policy``, ``cpu_offload``, ...).
    """

    def __init__(self, auto_wrap_policy: Any = None, state_dict_type: str = "sharded",
                 **kwargs: Any) -> None:
        super().__init__(auto_wrap_policy=auto_wrap_policy or {TransformerLayer},
                         state_dict_type=state_dict_type, **kwargs)

    @property
    def mixed_precision_config(self) -> MixedPrecision | None:
        config = super().mixed_precision_config
        if self.mixed_precision is None and self.precision_plugin.precision == "bf16-mixed":
            # bf16 matmuls; fp32 gradient all-reduce and buffers (the prior's variance).
            return MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  buffer_dtype=torch.float32)
        return config

    def _setup_model(self, model: Module) -> Module:
        if self.root_device.type == "cpu" and not any(
                isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            # Lightning gives FSDP device_id=None on CPU, from which torch infers "no
            # accelerator" and refuses; naming the CPU device is all FSDP needs for gloo.
            model = FullyShardedDataParallel(
                module=model, cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=self.root_device,
                **self.kwargs)
            self.kwargs.pop("auto_wrap_policy", None)  # applied; Lightning would warn again
        return super()._setup_model(model)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any,
                        storage_options: Any = None) -> None:
        """Sharded saves go to ``.<name>.tmp`` and replace ``<name>`` only once complete."""
        if self._state_dict_type != "sharded":
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        final = Path(self.broadcast(filepath))
        tmp = final.parent / f".{final.name}.tmp"  # hidden, and not "*.ckpt" for Lightning
        old = final.parent / f".{final.name}.old"
        if self.is_global_zero:
            for leftover in (tmp, old):
                shutil.rmtree(leftover, ignore_errors=True)
        self.barrier("tarflow_fsdp_save_start")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("tarflow_fsdp_save_written")  # every rank's shard is on disk
        if self.is_global_zero:
            if final.exists():
                os.replace(final, old)  # a crash between the renames leaves <name>.old whole
            os.replace(tmp, final)
            fsync_dir(final.parent)  # the renames survive a power loss
            shutil.rmtree(old, ignore_errors=True)
        self.barrier("tarflow_fsdp_save_done")


@contextmanager
def sampling_network(trainer: L.Trainer, net: TarFlow) -> Iterator[TarFlow]:
    """``net``, or under FSDP a plain (unwrapped) copy of it with the full parameters.

    Outside ``forward`` FSDP modules hold only their shard, and every call of an FSDP-wrapped
    layer gathers its parameters with a collective. Samplers stop converged samples early, so
    ranks make different numbers of calls and those collectives would deadlock. The copy is
    gathered once (``summon_full_params``, a collective every rank enters) and then runs
    locally; it is freed when the block exits.
    """
    model = getattr(trainer.strategy, "model", None)
    if not isinstance(model, FullyShardedDataParallel):
        yield net
        return
    device = next(iter(net.buffers())).device  # buffers are never sharded
    plain = TarFlow(net.config).to(device)
    with FullyShardedDataParallel.summon_full_params(model, writeback=False):
        named = dict(net.named_parameters())
        named.update(net.named_buffers())
        # FSDP renames wrapped modules' tensors: blocks.0.attn_blocks._fsdp_wrapped_module.0...
        state = {name.replace(FSDP_PREFIX, ""): t.detach() for name, t in named.items()}
        plain.load_state_dict(state, strict=True)  # copies
    try:
        yield plain.eval()
    finally:
        del plain


def is_fsdp(strategy: Any) -> bool:
    """True for FSDP strategies given as an object, a class, a registered name or a config."""
    if isinstance(strategy, FSDPStrategy) or (isinstance(strategy, type)
                                              and issubclass(strategy, FSDPStrategy)):
        return True
    return isinstance(strategy, str) and strategy.startswith("fsdp")
