"""The launchers of ``tarflow/conf/hydra/launcher/``: submitit's, with tarflow's start-up check
(:func:`tarflow.app.checks.sweeps.check_launcher`) before anything is submitted; the local one
also runs at most ``max_parallel`` jobs at a time, each with ``threads_per_job`` threads."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any
from unittest import mock

from hydra.core.utils import JobReturn
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import DictConfig


def _checked(config: DictConfig) -> None:
    from tarflow.app.checks.sweeps import check_launcher

    check_launcher(config)


class CheckedSlurmLauncher(SlurmLauncher):
    """``hydra/launcher=slurm``: one SLURM job per sweep point, refused before submission when
    its tasks per node or nodes disagree with the trainer."""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        _checked(config)
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)


class ParallelLocalLauncher(LocalLauncher):
    """Runs the jobs as processes of this machine in batches of ``max_parallel``."""

    def __init__(self, max_parallel: int | None = None, threads_per_job: int = 1,
                 **params: Any) -> None:
        super().__init__(**params)
        self.max_parallel = max_parallel
        self.threads_per_job = threads_per_job

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        _checked(config)
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from tarflow.app.launchers import local_batches, thread_environment

        batch = local_batches(len(job_overrides), self.max_parallel, self.threads_per_job)
        returns: list[JobReturn] = []
        # The job processes inherit this environment (restored afterwards).
        with mock.patch.dict(os.environ, thread_environment(self.threads_per_job)):
            for start in range(0, len(job_overrides), batch):
                returns += super().launch(job_overrides[start:start + batch],
                                          initial_job_idx + start)
        return returns
