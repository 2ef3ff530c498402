"""Ring 1: the TarFlow model in pure torch (no Lightning, Hydra, OmegaConf or W&B)."""

from tarflow.model.attention import KVCache
from tarflow.model.checkpoint import CheckpointError, infer_config
from tarflow.model.config import PRESETS, TarFlowConfig, preset
from tarflow.model.flow import FlowBlock
from tarflow.model.guidance import Guidance
from tarflow.model.tarflow import FlowOutput, TarFlow

__all__ = ["PRESETS", "CheckpointError", "FlowBlock", "FlowOutput", "Guidance", "KVCache",
           "TarFlow", "TarFlowConfig", "infer_config", "preset"]
