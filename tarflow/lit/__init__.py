"""Ring 2: Lightning glue (LightningModule, DataModule, EMA, logger helpers); no algorithms here."""

from tarflow.lit.datamodule import EpochShuffleSampler, TarFlowDataModule
from tarflow.lit.ema import EMA, WarmupEMA
from tarflow.lit.module import TarFlowLitModule, WarmupCosine

__all__ = [
    "EMA",
    "EpochShuffleSampler",
    "TarFlowDataModule",
    "TarFlowLitModule",
    "WarmupCosine",
    "WarmupEMA",
]
