"""Official FID statistics (a torchmetrics state dict) as the reference of ``tarflow-eval`` and of
the validation callback: the same FID as our own cache of the same images, provenance recorded,
the file never touched, bad files refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from torchmetrics.image.fid import FrechetInceptionDistance

from tarflow.cli import evaluate
from tarflow.data import build_dataset
from tarflow.data.subsets import fixed_subset, stack_items
from tests.integration.test_sample_eval_cli import EXTRACTOR, FAKE, checkpoint, compose_cfg
from tests.integration.test_sampling_callback import (
    TinyExtractor,
    tiny_callback,
    tiny_data,
    tiny_module,
    trainer,
)

__all__ = ["checkpoint"]  # the module-scoped fixture, shared with the eval CLI tests

EVAL = [*FAKE, "fid.num_samples=8", "fid.batch_size=4", "fid.reference_size=16",
        f"fid.extractor={{_target_:{EXTRACTOR}}}", "bpd.enabled=false"]


def official_stats(path: Path, images: torch.Tensor) -> Path:
    """What the TarFlow authors' prepare_fid_stats.py writes: a FrechetInceptionDistance's
    state dict after real-image updates (here over the tiny extractor)."""
    extractor = TinyExtractor()
    extractor.num_features = 32
    fid = FrechetInceptionDistance(feature=extractor)
    fid.update(images, real=True)
    fid.persistent(True)
    torch.save(fid.state_dict(), path)
    return path


def reference_images(split: str, count: int, **kwargs) -> torch.Tensor:
    """The images our cache is computed from: the seed-0 subset of the split."""
    data = build_dataset("fake", img_size=8, split=split, channels=1, flip=False, **kwargs)
    return stack_items(data, fixed_subset(data, count, 0))[0]


def test_eval_with_official_stats_matches_our_cache(tmp_path: Path, checkpoint: Path) -> None:
    ours = evaluate.run(compose_cfg("eval", tmp_path / "a", [f"ckpt_path={checkpoint}", *EVAL]))
    assert ours["fid_reference"]["format"] == "tarflow-npz"
    assert ours["fid_reference"]["num_samples"] == 16

    path = official_stats(tmp_path / "fake_8_fid_stats.pth",
                          reference_images("train", 16, length=40, num_classes=3))
    before = path.read_bytes()
    theirs = evaluate.run(compose_cfg("eval", tmp_path / "b", [
        f"ckpt_path={checkpoint}", *EVAL, f"fid.stats_path={path}"]))
    assert theirs["val/fid_8"] == pytest.approx(ours["val/fid_8"], rel=1e-8)
    record = json.loads((tmp_path / "b" / "out" / "eval.json").read_text())["fid_reference"]
    assert record["format"] == "torchmetrics-fid" and record["num_samples"] == 16
    assert record["path"] == str(path) and len(record["sha256"]) == 64
    assert record["img_size"] == 8 and path.read_bytes() == before


def test_eval_refuses_unusable_references_before_work(tmp_path: Path, checkpoint: Path) -> None:
    wrong_size = official_stats(tmp_path / "fake_64_fid_stats.pth", torch.rand(4, 1, 8, 8))
    bad = tmp_path / "stats.pth"
    torch.save({"inception.conv.weight": torch.zeros(1)}, bad)
    cases = {str(tmp_path / "missing.pth"): (FileNotFoundError, "read, never computed"),
             str(wrong_size): (ValueError, "for 64px images"),
             str(bad): (ValueError, "persistent")}
    for stats_path, (error, fragment) in cases.items():
        cfg = compose_cfg("eval", tmp_path, [f"ckpt_path={checkpoint}", *EVAL,
                                             f"fid.stats_path={stats_path}"])
        with pytest.raises(error, match=fragment):
            evaluate.run(cfg)
        assert not (tmp_path / "out").exists()  # refused before any record was written


def test_callback_uses_official_stats_and_records_them(tmp_path: Path) -> None:
    path = official_stats(tmp_path / "fake_8_fid_stats.pth",
                          reference_images("train", 24, num_classes=3, length=32))
    before = path.read_bytes()
    cb = tiny_callback(tmp_path, fid_stats_path=str(path), probe_size=0, compare_sequential=0,
                       sampler={"name": "jacobi", "schedule": "jacobi", "tol": 1e-3})
    logger = CSVLogger(str(tmp_path / "csv"), name="", version="run")
    trainer(tmp_path, [cb], logger=logger).fit(tiny_module(), tiny_data())
    metrics = (tmp_path / "csv" / "run" / "metrics.csv").read_text()
    assert "val/fid_12" in metrics.splitlines()[0]
    hparams = yaml.safe_load((tmp_path / "csv" / "run" / "hparams.yaml").read_text())
    assert hparams["fid_reference"]["format"] == "torchmetrics-fid"
    assert hparams["fid_reference"]["num_samples"] == 24
    assert path.read_bytes() == before and not (tmp_path / "ref.npz").exists()
