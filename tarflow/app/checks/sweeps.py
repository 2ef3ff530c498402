"""Start-up checks of a sweep's launch (``hydra/launcher=slurm|local``), before any job runs.

SLURM starts ``tasks_per_node`` processes on each of ``nodes`` nodes, and Lightning, seeing
SLURM, takes each for one rank: ``tasks_per_node`` must equal ``trainer.devices`` and ``nodes``
``trainer.num_nodes``. With fewer tasks Lightning starts its own processes by re-running the
entry script (submitit's, under the launchers) and the job hangs or runs twice (hydra#2231).
The launcher reads both once per sweep, so sweeping ``trainer.devices`` is refused too. Any
other sweep runs each job as one process, where a trainer that starts its processes by
re-running the command (plain ``ddp``, FSDP, ``auto`` with several devices) would run the sweep
again in each child: :func:`check_sweep_job` refuses it (``ddp_spawn`` works).
"""

from __future__ import annotations

import os

from omegaconf import DictConfig


def _swept(config: DictConfig) -> set[str]:
    """Keys that the sweep's command line gives several values (``a=1,2``, ``range``...)."""
    from tarflow.app.train_sweep import swept_keys

    return set(swept_keys(list(config.hydra.overrides.task)))


def _strategy_name(trainer: DictConfig) -> str:
    strategy = trainer.get("strategy")
    if isinstance(strategy, DictConfig):
        return str(strategy.get("_target_", "")).rsplit(".", 1)[-1].lower()
    return str(strategy or "auto").lower()


def check_launcher(config: DictConfig) -> None:
    """Refuse a sweep whose launcher and trainer disagree (see the module doc); run by the
    launchers before anything is submitted.

    Raises:
        ValueError: naming the keys to change.
    """
    launcher = config.hydra.get("launcher") or {}
    target = str(launcher.get("_target_", ""))
    trainer = config.get("trainer")
    if not isinstance(trainer, DictConfig):  # tarflow-eval / tarflow-sample: no Lightning ranks
        return
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes", 1)
    slurm = target.startswith("hydra_plugins.") and "Slurm" in target  # submitit's or ours
    if slurm:
        swept = _swept(config) & {"trainer.devices", "trainer.num_nodes"}
        if swept:
            raise ValueError(f"hydra/launcher=slurm requests one shape of job per sweep; "
                             f"{', '.join(sorted(swept))} cannot vary inside it: run one sweep "
                             f"per value")
        for key, want, name in (("tasks_per_node", devices, "trainer.devices"),
                                ("nodes", nodes, "trainer.num_nodes")):
            have = launcher.get(key)
            if str(have) != str(want):
                raise ValueError(
                    f"hydra.launcher.{key}={have} but {name}={want}: SLURM starts one Lightning "
                    f"process per task, so they must be equal (leave hydra.launcher.{key} "
                    f"unset: it follows {name})")
        return
    check_sweep_job(trainer)


def check_sweep_job(trainer: DictConfig) -> None:
    """A sweep job is one process unless SLURM starts its ranks: refuse a trainer that would
    start more by re-running the command."""
    if os.environ.get("SLURM_NTASKS") and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        return  # the ranks are SLURM's tasks, checked against the launcher before submission
    devices = trainer.get("devices")
    if str(devices).isdigit() and int(devices) > 1 and "spawn" not in _strategy_name(trainer):
        raise ValueError(
            f"trainer.devices={devices} with strategy {_strategy_name(trainer)} under a sweep "
            f"that is not SLURM's: Lightning would start its processes by re-running this "
            f"command; use trainer.strategy=ddp_spawn, or hydra/launcher=slurm")


