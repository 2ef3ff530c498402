"""Sweeps on a SLURM cluster or in parallel on this machine (``hydra/launcher=slurm|local``).

The launchers are configs (``tarflow/conf/hydra/launcher/``) over Hydra's submitit plugin; this
module holds what the configs cannot say:

* The start-up check of a launch whose processes would not match the trainer's is
  :func:`tarflow.app.checks.sweeps.check_launcher`, run by the launchers
  (``hydra_plugins/tarflow_sweeps/launchers.py``) before any job is submitted.
* :func:`gpus_per_node` / :func:`cpus_per_task` (resolvers of the launcher configs) and
  :func:`local_batches` / :func:`thread_environment` (the local launcher's cap and threads).
* Requeue on timeout is submitit's alone: its sbatch script asks SLURM for ``USR2`` before the
  time limit, and on that signal it requeues the same job (at most ``max_num_timeout`` times).
  :func:`cluster_plugins` gives the Trainer a ``SLURMEnvironment(auto_requeue=False)`` in a
  submitit SLURM job, so Lightning installs no requeue handler of its own (two would requeue
  the job twice). A requeued job runs the same overrides in the same job folder, and
  :func:`resume_sweep_job` continues it from its ``checkpoints/last.ckpt`` (same W&B run: its id
  comes from the folder); a job that had finished is not trained again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tarflow.app.errors import in_multirun

log = logging.getLogger(__name__)

def gpus_per_node(accelerator: Any, devices: Any) -> int:
    """``hydra.launcher.gpus_per_node`` from the trainer: its device count unless it trains on
    the CPU (``auto`` counts as GPUs: the machine that submits may have none)."""
    if str(accelerator).lower() == "cpu" or not str(devices).isdigit():
        return 0
    return int(devices)


def cpus_per_task(num_workers: Any) -> int:
    """``hydra.launcher.cpus_per_task``: the training process and its data workers."""
    return int(num_workers or 0) + 1


for _name, _fn in (("tarflow_gpus_per_node", gpus_per_node),
                   ("tarflow_cpus_per_task", cpus_per_task)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


def local_batches(jobs: int, max_parallel: int | None, threads_per_job: int) -> int:
    """Jobs the local launcher starts at once: ``max_parallel``, or the cores here divided by
    the threads of each job (at least 1)."""
    if max_parallel:
        return max(1, int(max_parallel))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(jobs, cores // max(1, int(threads_per_job))))


def thread_environment(threads_per_job: int) -> dict[str, str]:
    """Environment variables that give a job's process ``threads_per_job`` threads (torch reads
    ``OMP_NUM_THREADS`` when it starts)."""
    n = str(max(1, int(threads_per_job)))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


def cluster_plugins(plugins: list[Any]) -> list[Any]:
    """The Trainer's cluster plugin in a submitit SLURM job: SLURM's environment without
    Lightning's requeue handler (submitit requeues). Empty elsewhere or when one is set."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return []
    from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment

    if any(isinstance(p, ClusterEnvironment) for p in plugins):
        return []
    return [SLURMEnvironment(auto_requeue=False)]


def resume_sweep_job(cfg: DictConfig, result_file: str = "train.json") -> dict | None:
    """In a sweep job with no ``ckpt_path``: an earlier attempt of this same job (requeued by
    SLURM, or a stopped sweep run again into its folder with ``hydra.sweep.dir=``).

    Returns the job's recorded result when it had finished (the caller skips the training);
    otherwise sets ``cfg.ckpt_path`` to the job's ``last.ckpt`` when there is one, and
    returns None.
    """
    if not in_multirun() or cfg.get("ckpt_path"):
        return None
    out = Path(str(cfg.paths.output_dir))
    done = out / result_file
    if done.is_file():
        try:
            return json.loads(done.read_text())
        except ValueError:
            pass
    last = out / "checkpoints" / "last.ckpt"
    if last.exists():
        OmegaConf.update(cfg, "ckpt_path", str(last), force_add=True)
        log.info("continuing this sweep job from %s (an earlier attempt's checkpoint)", last)
    return None
