"""Issue 27 (sampling side): ``tarflow-sample`` under ``torchrun`` (2 gloo ranks on the CPU)
writes the same set as one process with another batch size; a 2-rank job killed with SIGKILL
and re-run with ``if_exists=resume`` ends with the same ``samples.npz`` as an uninterrupted one;
more ranks than samples is refused. Issue 30 item 13: the default sampler is the checkpoint's
validation sampler.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tarflow.model import TarFlow, TarFlowConfig
from tests.reliability.helpers import run_cli, subprocess_env
from tests.reliability.sample_kill import kill_tree
from tests.reliability.test_eval_sampler import VALIDATION, validated_checkpoint  # noqa: F401

N, SHARD = 40, 4
COMMON = ["device=cpu", "progress=false", "format=npz", f"num_samples={N}",
          f"shard_size={SHARD}", "sampler=sequential"]


@pytest.fixture(scope="module")
def cond(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A conditional tiny model (3 classes, 8x8x1) as a plain ``.pt``: labels are drawn too."""
    torch.manual_seed(0)
    net = TarFlow(TarFlowConfig(img_size=8, in_channels=1, patch_size=2, channels=32,
                                num_blocks=2, layers_per_block=1, num_classes=3, head_dim=16))
    for block in net.blocks:  # a fresh TarFlow is the identity map
        nn.init.normal_(block.proj_out.weight, std=0.05)
    return net.save_checkpoint(tmp_path_factory.mktemp("cond") / "cond.pt")


def _torchrun(args: list[str], cwd: Path, module: str = "tarflow.cli.sample") -> subprocess.Popen:
    """``torchrun --standalone --nproc-per-node=2 --no-python tarflow-sample <args>`` with the
    checkout's entry point, in its own process group (so a kill can take all of it)."""
    # --no-python runs the program as given (users: tarflow-sample; here the checkout's copy).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--no-python", sys.executable, "-m", module, *args]
    return subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(cwd / "wandb_home"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"torchrun still running after {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def _npz(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "samples.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def runs(cond: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One process (batch 3), two ranks (batch 2, the default run dir), and two ranks killed
    with SIGKILL once the first shard exists; the first two run at the same time."""
    tmp = tmp_path_factory.mktemp("ranks")
    ckpt = f"ckpt_path={cond}"
    one = subprocess.Popen([sys.executable, "-m", "tarflow.cli.sample", ckpt, *COMMON,
                            "batch_size=3", f"hydra.run.dir={tmp / 'one'}"], cwd=tmp,
                           env=subprocess_env(tmp / "wandb_home"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    (tmp / "two").mkdir()
    two = _torchrun([ckpt, *COMMON, "batch_size=2"], cwd=tmp / "two")
    results = {"one": _wait(one), "two": _wait(two), "tmp": tmp}
    killed_dir = tmp / "killed"
    # The first rank to finish a shard kills torchrun and both ranks (SIGKILL, no cleanup).
    killed = _torchrun([ckpt, *COMMON, "batch_size=2", f"hydra.run.dir={killed_dir}"], cwd=tmp,
                       module="tests.reliability.sample_kill")
    results["killed"] = _wait(killed)
    shards = killed_dir / "shards"
    results["left"] = sorted(p.name for p in shards.iterdir()) if shards.is_dir() else []
    results["finished_before_kill"] = (killed_dir / "samples.npz").exists()
    results["resumed"] = _wait(_torchrun([ckpt, *COMMON, "batch_size=2", "if_exists=resume",
                                          f"hydra.run.dir={killed_dir}"], cwd=tmp))
    return results


def test_two_ranks_write_the_set_of_one_process(runs: dict) -> None:
    tmp = runs["tmp"]
    for name in ("one", "two"):
        code, _, err = runs[name]
        assert code == 0, (name, err[-3000:])
    # Rank 0 chose the run dir; rank 1's own ${now:} dir (maybe a second later) is not left.
    made = list((tmp / "two" / "outputs" / "sample").iterdir())
    assert len(made) == 1, made
    one, two = _npz(tmp / "one"), _npz(made[0])
    assert one["arr_0"].shape == (N, 8, 8, 1) and one["arr_0"].dtype == np.uint8
    assert one["indices"].tolist() == list(range(N)) == two["indices"].tolist()
    np.testing.assert_array_equal(one["arr_1"], two["arr_1"])
    assert set(one["arr_1"].tolist()) == {0, 1, 2}
    diff = np.abs(one["arr_0"].astype(np.int16) - two["arr_0"].astype(np.int16))
    assert diff.max() <= 1, diff.max()  # within 1/255: batch composition changes the last bit
    summary = json.loads((made[0] / "sample_summary.json").read_text())
    assert summary["ranks"] == 2 and summary["num_samples"] == N
    # Only rank 0 wrote records and the log; the shards hold every member once.
    assert (made[0] / ".hydra" / "config.yaml").is_file()
    assert not (made[0] / ".hydra" / "1").exists()
    assert len(list((made[0] / "shards").glob("*.npz"))) == N // SHARD


def test_a_killed_two_rank_job_resumes_to_the_same_set(runs: dict) -> None:
    tmp = runs["tmp"]
    assert runs["killed"][0] == -9 or runs["killed"][0] != 0, runs["killed"][2][-3000:]
    assert not runs["finished_before_kill"]
    finished = [name for name in runs["left"] if not name.startswith(".")]
    assert 1 <= len(finished) < N // SHARD, runs["left"]
    code, out, err = runs["resumed"]
    assert code == 0, err[-3000:]
    assert "resuming the set of" in out and "the rest resumed" in out, out
    resumed, two = _npz(tmp / "killed"), _npz(next((tmp / "two" / "outputs" / "sample")
                                                   .iterdir()))
    for key in ("arr_0", "arr_1", "indices"):
        np.testing.assert_array_equal(resumed[key], two[key])  # same batch size: bit for bit
    assert not [p for p in (tmp / "killed" / "shards").iterdir() if p.name.startswith(".")]


def test_more_ranks_than_samples_is_refused_before_any_file(cond: Path, tmp_path: Path) -> None:
    out = tmp_path / "few"
    code, _, err = _wait(_torchrun([f"ckpt_path={cond}", "device=cpu", "num_samples=1",
                                    f"hydra.run.dir={out}"], cwd=tmp_path))
    assert code != 0
    # Rank 0 says it once (torchrun then adds its own report of a failed worker).
    assert err.count("error: num_samples=1 is fewer than the 2 ranks") == 1, err[-3000:]
    assert not out.exists() or not any(out.iterdir())


def test_sample_defaults_to_the_validation_sampler(validated_checkpoint: Path,  # noqa: F811
                                                   tmp_path: Path) -> None:
    result = run_cli("sample", f"ckpt_path={validated_checkpoint}", "device=cpu",
                     "progress=false", "num_samples=2", "format=npz",
                     f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.code == 0, result.err[-3000:]
    summary = json.loads((tmp_path / "out" / "sample_summary.json").read_text())
    assert summary["sampler_source"] == "validation" and summary["schedule"] == "jacobi"
    assert summary["knobs"]["denoise"] == 0.5 and summary["validation_sampler"] == VALIDATION
    assert "as in validation (recorded in the checkpoint)" in result.out
    job = json.loads((tmp_path / "out" / "sample_job.json").read_text())
    assert job["identity"]["sampler"]["schedule"] == "jacobi"
