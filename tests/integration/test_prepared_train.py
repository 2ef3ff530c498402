"""Training reads a prepared set (``data.root`` = a tarflow-prepare directory) through the data
module, with DataLoader workers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tarflow.cli.train import train
from tarflow.data import PreparedDataset, prepare_dataset, write_imagenet_npz
from tests.integration.conftest import TINY, compose_train


def test_fast_dev_run_on_prepared_imagenet64(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, n in (("train_data_batch_1", 24), ("train_data_batch_2", 16), ("val_data", 8)):
        images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
        write_imagenet_npz(tmp_path / "npz" / name, images, rng.integers(0, 1000, n))
    prepare_dataset("imagenet64", tmp_path / "npz", tmp_path / "prepared", img_size=8)
    data = [o for o in TINY if not o.startswith("data.")]
    data = [o for o in data if o != "data=fake"]
    cfg = compose_train(
        tmp_path,
        [
            *data,
            "data=imagenet64",
            f"data.root={tmp_path / 'prepared'}",
            "data.img_size=8",
            "data.batch_size=4",
            "data.num_workers=2",
            "data.pin_memory=false",
            "debug=fast_dev_run",
            "logger=csv",
        ],
    )
    result = train(cfg)
    assert math.isfinite(result["metrics"]["train/loss"])
    assert math.isfinite(result["metrics"]["val/bpd"])
    datamodule = result["trainer"].datamodule
    assert isinstance(datamodule.train_set, PreparedDataset)
    assert isinstance(datamodule.val_set, PreparedDataset)
