"""Issue 28: sweeps through Hydra's submitit launchers and Optuna searches, as a user runs them
(console commands in fresh interpreters): ``hydra/launcher=slurm`` takes its shape from the
trainer and its job script runs under a fake SLURM as far as Lightning computing the world;
``hydra/launcher=local`` runs the jobs as separate processes; the sampler search writes
Optuna's results and the Pareto front, and continues after a kill."""

from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
import torch
import yaml

from tests.integration.conftest import REPO
from tests.integration.fake_slurm import JOB_ID, LOG_ENV, PROBE_ENV, install
from tests.integration.test_sample_eval_cli import EXTRACTOR, FAKE, checkpoint  # noqa: F401
from tests.reliability.helpers import (
    TINY,
    assert_one_line_error,
    run_cli,
    run_clis,
    snapshot,
    subprocess_env,
)

SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
         "logger=csv", "final_samples.enabled=false"]
SLURM_SHAPE = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
TINY_DATA = [o for o in TINY if not o.startswith("trainer=")]  # the trainer is SLURM_SHAPE's


def test_the_slurm_launcher_follows_the_trainer_and_refuses_a_hand_set_mismatch(
        tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    shown, refused = run_clis([
        ("train", [*SLURM_SHAPE, "--cfg", "hydra", "--resolve"]),
        ("train", ["-m", *SLURM_SHAPE, "hydra.launcher.tasks_per_node=2", *TINY_DATA,
                   f"hydra.sweep.dir={sweep}", f"paths.root_dir={tmp_path}"]),
    ], cwd=tmp_path)
    assert shown.code == 0, shown.err[-2000:]
    launcher = yaml.safe_load(shown.out)["hydra"]["launcher"]
    assert (launcher["tasks_per_node"], launcher["nodes"], launcher["gpus_per_node"]) == (4, 2, 4)
    assert_one_line_error(refused, "hydra.launcher.tasks_per_node=2 but trainer.devices=4")
    assert not sweep.exists()  # refused before anything was submitted or written


def test_the_slurm_job_script_runs_with_the_world_slurm_describes(tmp_path: Path) -> None:
    """2 nodes x 4 tasks: submitit's sbatch script and srun line run (task 0 only, on this
    machine) and Lightning sees SLURM's world of 8 without a launcher of its own or a requeue
    handler; the probe stops the job where the process group would wait for the other 7."""
    bin_dir = install(tmp_path / "bin")
    env = subprocess_env(tmp_path / "wandb_home", **{
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        PROBE_ENV: str(tmp_path / "world.json"), LOG_ENV: str(tmp_path / "slurm.log")})
    sweep = tmp_path / "sweep"
    result = run_cli("train", "-m", *SLURM_SHAPE, "trainer.accelerator=cpu",
                     "trainer.precision=32-true",
                     "trainer.strategy={_target_:tests.integration.fake_slurm.WorldProbe}",
                     *TINY_DATA, "logger=csv", "hydra.launcher.partition=gpu",
                     "hydra.launcher.srun_args=['--cpu-bind=none']",
                     f"hydra.sweep.dir={sweep}", f"paths.root_dir={tmp_path}",
                     cwd=tmp_path, env=env, timeout=300)
    assert (tmp_path / "world.json").is_file(), (result.code, result.out[-2000:],
                                                 result.err[-3000:])
    world = json.loads((tmp_path / "world.json").read_text())
    assert world == {"world_size": 8, "global_rank": 0, "local_rank": 0, "node_rank": 0,
                     "num_nodes": 2, "num_processes": 4, "cluster_environment": "SLURMEnvironment",
                     "auto_requeue": False}
    sbatch, srun = (tmp_path / "slurm.log").read_text().splitlines()
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--partition=gpu", "--signal=USR2@120"):
        assert flag in sbatch.split(), sbatch
    assert "--cpu-bind=none" in srun.split() and "submitit.core._submit" in srun
    # The probe's stop is the job's failure: one row, one line, status 1, no traceback.
    assert result.code == 1, result.err[-3000:]
    assert "Traceback" not in result.err
    failed = json.loads((sweep / "0" / "failed.json").read_text())
    assert failed["error"] == "RuntimeError: world probe: stopped before the process group"
    assert "failed: RuntimeError: world probe" in (sweep / "summary.md").read_text()
    assert (sweep / ".submitit" / JOB_ID / f"{JOB_ID}_0_log.out").is_file()


def test_a_requeued_sweep_job_continues_from_its_last_checkpoint(tmp_path: Path) -> None:
    """What a requeue is to a job: the same command line again in the same job folder (SLURM
    restarts submitit's job after a timeout or preemption). Here the sweep process is killed
    with SIGKILL two steps past the job's epoch-0 checkpoint, then started again as it was: the
    job continues from its last.ckpt to the end; a third start finds it finished and trains
    nothing."""
    from tests.reliability.hooks import KILL_ENV

    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "trainer.max_epochs=2", "logger=csv", "final_samples.enabled=false",
            "+callbacks.killer._target_=tests.reliability.hooks.KillAtStep",
            "module.optim.lr=1e-3", f"hydra.sweep.dir={sweep}", f"paths.root_dir={tmp_path}"]
    env = subprocess_env(tmp_path / "wandb_home")
    killed = run_cli("train", *args, cwd=REPO, env={**env, KILL_ENV: "6"})
    last = sweep / "0" / "checkpoints" / "last.ckpt"
    assert killed.code == -9 and last.is_file(), killed.err[-2000:]
    assert torch.load(last, weights_only=True)["global_step"] == 4  # 4 steps an epoch
    again = run_cli("train", *args, cwd=REPO, env=env)
    assert again.code == 0, again.err[-3000:]
    assert f"continuing this sweep job from {last}" in again.out + again.err
    assert torch.load(last, weights_only=True)["global_step"] == 8
    assert "\n| 0 | " in (sweep / "summary.md").read_text()  # the job's row
    before = snapshot(sweep / "0")
    third = run_cli("train", *args, cwd=REPO, env=env)
    assert third.code == 0 and "this sweep job had finished" in third.out, third.err[-2000:]
    assert snapshot(sweep / "0") == before  # nothing trained or written again


def test_a_local_sweep_runs_its_jobs_as_separate_processes(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli("train", "-m", "hydra/launcher=local", "hydra.launcher.max_parallel=2",
                     *TINY, *SHORT, "module.optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}",
                     f"paths.root_dir={tmp_path}", cwd=tmp_path, timeout=400)
    assert result.code == 0, result.err[-3000:]
    table = (sweep / "summary.md").read_text()
    assert "| 0 | 0.001 |" in table and "| 1 | 0.002 |" in table
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
    # submitit's local executor: one folder per job process, named by its process id.
    pids = {p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit()}
    assert len(pids) == 2 and str(os.getpid()) not in pids


def test_the_sampler_search_writes_its_front_and_continues_after_a_kill(
        tmp_path: Path, checkpoint: Path) -> None:  # noqa: F811
    sweep = tmp_path / "search"
    args = ["hparams_search=optuna_sampler", f"ckpt_path={checkpoint}", *FAKE,
            "fid.num_samples=4", "fid.reference_size=8", f"fid.extractor={{_target_:{EXTRACTOR}}}",
            "device=cpu", "probe.size=8", f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={sweep}",
            # cheap schedules only: no planner runs here (the other parameters stay searched)
            "hydra.sweeper.params={sampler.schedule:'choice(sequential,jacobi)'}"]
    first = run_cli("evaluate", *args, "hydra.sweeper.n_trials=3", cwd=tmp_path, timeout=400)
    assert first.code == 0, first.err[-3000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna" and results["solutions"]
    for solution in results["solutions"]:
        assert len(solution["values"]) == 2  # FID@4 and seconds per image
    front = (sweep / "pareto.md").read_text()
    assert front.startswith("| job | s/image | val/fid_4 |") and (sweep / "pareto.png").is_file()
    assert "of 3 finished jobs are on the front" in front
    # A kill mid-trial leaves a running trial; the same command continues the study.
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    optuna.load_study(study_name="sampler_search", storage=storage).ask()
    again = run_cli("evaluate", *args, "hydra.sweeper.n_trials=4", cwd=tmp_path, timeout=400)
    assert again.code == 0, again.err[-3000:]
    trials = optuna.load_study(study_name="sampler_search", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 + ["FAIL", "COMPLETE"]
    assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == ["0", "1", "2", "4"]
    assert json.loads((sweep / "4" / "eval.json").read_text())["val/fid_4"] > 0
