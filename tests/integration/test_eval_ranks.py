"""``tarflow-eval`` on 2 ranks (torchrun, gloo) reports the one-process FID, IS, KID, precision
and recall, writes one eval.json, CSV row, grid and W&B run; ``samples=PATH`` scores an ADM
``.npz`` and a PNG folder (issue 27, items 3 and 4)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tarflow.cli import evaluate
from tests.integration.test_sample_eval_cli import FAKE, checkpoint, compose_cfg
from tests.unit.test_metrics import TinyClassifier

__all__ = ["checkpoint"]

REPO = Path(__file__).resolve().parents[2]
CLASSIFIER = f"fid.extractor={{_target_:{TinyClassifier.__module__}.TinyClassifier}}"
EVAL = [*FAKE, "fid.num_samples=16", "fid.batch_size=4", "fid.reference_size=16", CLASSIFIER,
        "sampler=sequential", "metrics.kid_subsets=5",
        "metrics.isc_splits=2", "data.batch_size=8", "log.grid_size=8"]
METRICS = ("inception_score", "kid", "precision", "recall", "val/bpd")


def torchrun(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    torchrun_bin = shutil.which("torchrun")
    assert torchrun_bin, "torchrun is not on PATH"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DIR": str(cwd / "wandb_home"), "WANDB_CONFIG_DIR": str(cwd / "wandb_home")}
    return subprocess.run([torchrun_bin, "--standalone", "--nproc-per-node=2", "--no-python",
                           "tarflow-eval", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_two_ranks_equal_one(tmp_path: Path, checkpoint: Path) -> None:
    run_dir = tmp_path / "two"
    proc = torchrun([f"ckpt_path={checkpoint}", *EVAL, "device=cpu", "progress=false",
                     f"paths.root_dir={tmp_path}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((run_dir / "eval.json").read_text())
    one = evaluate.run(compose_cfg("eval", tmp_path / "one", [f"ckpt_path={checkpoint}", *EVAL]))
    assert two["ranks"] == 2 and one["ranks"] == 1 and two["num_samples"] == 16
    # The same members drawn in other batches: equal up to float rounding.
    assert two["val/fid_16"] == pytest.approx(one["val/fid_16"], rel=1e-5)
    for key in METRICS:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-9), key
    assert two["protocol"]["ranks"] == 2 and two["protocol"]["num_samples"] == 16
    assert "16 dataset images" in two["protocol"]["reference"]["images"]
    # rank 0 alone wrote: one eval.json, its CSV row, grid and an offline W&B run.
    assert len(list(tmp_path.rglob("eval.json"))) == 2  # this run's and the 1-rank one's
    assert "metrics over 16 samples: FID" in proc.stdout and proc.stdout.count("FID ") == 1
    assert (run_dir / "eval.csv").read_text().count("\n") == 2
    assert Image.open(run_dir / "samples_grid.png").size[0] > 0
    assert list((run_dir / "wandb").glob("offline-run-*"))


def adm_npz(path: Path, images: np.ndarray, **extra: np.ndarray) -> Path:
    np.savez(path, arr_0=images, arr_1=np.arange(len(images)) % 3, **extra)
    return path


def test_samples_npz_and_png_folder_score_alike(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
    npz = adm_npz(tmp_path / "samples.npz", images)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0]).save(folder / f"{i:06d}.png")
    common = [*FAKE, "fid.reference_size=16", CLASSIFIER, "metrics.kid_subsets=5",
              "metrics.isc_splits=2"]
    a = evaluate.run(compose_cfg("eval", tmp_path / "a", [f"samples={npz}", *common]))
    b = evaluate.run(compose_cfg("eval", tmp_path / "b", [f"samples={folder}", *common]))
    assert a["num_samples"] == b["num_samples"] == 12 and a["checkpoint"] is None
    for key in ("val/fid_12", *METRICS[:-1]):
        assert a[key] == pytest.approx(b[key], rel=1e-9), key
    assert "val/bpd" not in a and a["samples"] == str(npz.resolve())
    # An ADM reference batch: FID from its mu/sigma, KID and precision/recall from its arr_0.
    ref = adm_npz(tmp_path / "ref.npz", images[::-1].copy(), mu=np.zeros(32),
                  sigma=np.eye(32))
    c = evaluate.run(compose_cfg("eval", tmp_path / "c", [f"samples={npz}", *common,
                                                          f"fid.stats_path={ref}"]))
    assert c["precision"] == 1.0 and c["recall"] == 1.0  # the same images, shuffled
    assert "arr_0 of" in c["protocol"]["reference"]["images"]
    assert c["fid_reference"]["format"] == "mu-sigma-npz"

