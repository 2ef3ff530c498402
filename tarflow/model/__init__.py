"""Ring 1: the TarFlow model in pure torch (no Lightning, Hydra, OmegaConf or W&B)."""

from tarflow.model.attention import KVCache
from tarflow.model.checkpoint import (
    CheckpointError,
    CheckpointSummary,
    describe_checkpoint,
    infer_config,
    load_weights,
)
from tarflow.model.config import PRESETS, TarFlowConfig, preset
from tarflow.model.flow import FlowBlock
from tarflow.model.guidance import Guidance
from tarflow.model.tarflow import FlowOutput, TarFlow, weights_mismatch

__all__ = ["PRESETS", "CheckpointError", "CheckpointSummary", "FlowBlock", "FlowOutput",
           "Guidance", "KVCache", "TarFlow", "TarFlowConfig", "describe_checkpoint",
           "infer_config", "load_weights", "preset", "weights_mismatch"]
