"""Issue 22 item 7: ``tarflow-eval`` samples as validation did unless told otherwise, and says
which sampler it used and which one validation used (output and ``eval.json``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tarflow.app.eval_sampler import recorded_validation_sampler
from tarflow.lit.callbacks.sampling import SamplingCallback
from tests.reliability.helpers import run_clis
from tests.reliability.test_sample_eval_input import QUIET, SMALL_FID

# What a validation round of the tiny run could have used: plain Jacobi with self-denoising.
VALIDATION = {"name": "jacobi", "schedule": "jacobi", "tol": 1.0e-4, "init": "zeros",
              "guidance": 0.0, "attn_temp": 1.0, "annealed": False, "guidance_rule": "linear",
              "denoise": 0.5, "check_every": None, "net_dtype": None}


def test_the_sampling_callback_records_its_sampler() -> None:
    callback = SamplingCallback(VALIDATION, num_samples=4)
    state = callback.state_dict()
    assert state["sampler"] == VALIDATION
    callback.load_state_dict(state)  # an older state without it loads too
    callback.load_state_dict({"validations": 2})
    assert callback.validations == 2


@pytest.fixture
def validated_checkpoint(tiny_run: Path, tmp_path: Path) -> Path:
    """The tiny run's checkpoint (its run had no sampling callback) as if validation had
    sampled with ``VALIDATION``: moved out of its run directory, the sampler in its state."""
    checkpoint = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["callbacks"]["SamplingCallback"] = {"validations": 1, "sampler": VALIDATION}
    path = tmp_path / "model.ckpt"
    torch.save(checkpoint, path)
    return path


def test_eval_samples_as_validation_did_and_says_so(validated_checkpoint: Path,
                                                    tmp_path: Path) -> None:
    common = [f"ckpt_path={validated_checkpoint}", *QUIET, *SMALL_FID, "bpd.enabled=false"]
    default, chosen = run_clis([
        ("evaluate", [*common, f"hydra.run.dir={tmp_path / 'default'}"]),
        ("evaluate", [*common, "sampler=sequential", f"hydra.run.dir={tmp_path / 'chosen'}"]),
    ], cwd=tmp_path)
    assert default.code == 0, default.err[-3000:]
    saved = json.loads((tmp_path / "default" / "eval.json").read_text())
    assert saved["sampler_source"] == "validation"
    assert saved["sampler_settings"]["schedule"] == "jacobi" and saved["sampler"] == "jacobi"
    assert saved["sampler_settings"]["denoise"] == 0.5 and saved["knobs"]["denoise"] == 0.5
    assert saved["validation_sampler"] == VALIDATION
    assert "as in validation (recorded in the checkpoint)" in default.out
    # A sampler chosen on the command line wins; the validation one is still reported.
    assert chosen.code == 0, chosen.err[-3000:]
    saved = json.loads((tmp_path / "chosen" / "eval.json").read_text())
    assert saved["sampler_source"] == "config" and saved["schedule"] == "sequential"
    assert saved["validation_sampler"] == VALIDATION
    assert "validation sampled with jacobi (schedule jacobi" in chosen.out


def test_a_runs_records_stand_in_for_older_checkpoints(tiny_run: Path, tmp_path: Path) -> None:
    """Checkpoints written before the sampler was recorded: the run's .hydra config says it."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_run / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    assert recorded_validation_sampler(run / "checkpoints" / "last.ckpt") == (None,
                                                                              "not recorded")
    (run / ".hydra").mkdir()
    config = {"sampler": VALIDATION, "callbacks": {"sampling": {"sampler": "${sampler}"}}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    sampler, where = recorded_validation_sampler(run / "checkpoints" / "last.ckpt")
    assert sampler == VALIDATION and where == "the run's .hydra"
