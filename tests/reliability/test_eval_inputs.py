"""``tarflow-eval`` refuses what it cannot score in one line, exit status 2, before any record or
work (issue 27, item 6): an ADM reference of another resolution, a samples ``.npz`` of the wrong
dtype or layout, more ranks than samples, ``fid.num_samples=0``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tarflow.model import TarFlow, TarFlowConfig
from tests.reliability.helpers import assert_one_line_error, call_main
from tests.reliability.test_sample_eval_input import EXTRACTOR, QUIET


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("eval_inputs")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp / "good.npz", arr_0=pixels)
    np.savez(tmp / "float.npz", arr_0=pixels.astype(np.float32) / 255)
    np.savez(tmp / "nchw.npz", arr_0=np.moveaxis(pixels, -1, 1))
    np.savez(tmp / "two.npz", arr_0=pixels[:2])
    np.savez(tmp / "ref16.npz", arr_0=rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8),
             mu=np.zeros(32), sigma=np.eye(32))
    torch.manual_seed(0)
    net = TarFlow(TarFlowConfig(img_size=8, in_channels=1, patch_size=2, channels=32,
                                num_blocks=2, layers_per_block=1, head_dim=16))
    return {"tmp": tmp, "ckpt": net.save_checkpoint(tmp / "model.pt")}


CASES = {
    "adm-reference-resolution": (["samples={tmp}/good.npz", "fid.stats_path={tmp}/ref16.npz"],
                                 {}, ["fid.stats_path=", "ADM reference of 16x16 images",
                                      "samples are 8x8"]),
    "samples-dtype": (["samples={tmp}/float.npz"], {}, ["samples=", "arr_0 is float32",
                                                       "(N, H, W, C) uint8"]),
    "samples-layout": (["samples={tmp}/nchw.npz"], {}, ["samples=", "(6, 1, 8, 8)"]),
    "more-ranks-than-samples": (["samples={tmp}/two.npz"], {"WORLD_SIZE": "3", "RANK": "0"},
                                ["3 ranks for samples=2 samples", "at most 2 ranks"]),
    "num-samples-0": (["ckpt_path={tmp}/model.pt", "fid.num_samples=0"], {},
                      ["fid.num_samples=0 must be an integer >= 2"]),
}


@pytest.mark.usefixtures("clean_hydra")
@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_one_line_before_anything_is_written(inputs: dict[str, Path], case: str,
                                                        capsys, monkeypatch) -> None:
    """Through ``tarflow-eval``'s ``main`` in this process, with the argv, cwd and rank
    variables a shell or torchrun would set (a refusal comes before any rank is joined)."""
    from tarflow.cli import evaluate

    extra, env, fragments = CASES[case]
    tmp = inputs["tmp"]
    out = tmp / "out" / case
    before = {p: p.stat().st_mtime_ns for p in tmp.glob("*.npz")}
    args = [a.format(tmp=tmp) for a in extra]
    monkeypatch.chdir(tmp)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = call_main(evaluate.main, ["tarflow-eval", *args, "data.name=fake", *QUIET,
                                       EXTRACTOR, f"hydra.run.dir={out}"], capsys)
    line = assert_one_line_error(result, *fragments)
    assert "Traceback" not in result.err, line
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))
    assert {p: p.stat().st_mtime_ns for p in tmp.glob("*.npz")} == before
    assert not list(tmp.rglob("eval.json")) and not list(tmp.rglob("*.features.npz"))
