"""A training sweep a user can read: ``tarflow-train -m module.optim.lr=1e-3,2e-3``.

Every job writes ``train.json`` (its overrides and final metrics) into its directory, so the
sweep's :class:`~tarflow.app.sweep_summary.SweepSummary` callback (``tarflow/conf/train.yaml``)
can print and save one table (``<sweep dir>/summary.md``) when the sweep ends; and each job's
W&B run joins the sweep's group and is named by the values it sweeps (all runs were called
``demo`` with ``group: null`` before).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tarflow.app.errors import in_multirun
from tarflow.app.runs import is_secondary_process, write_keeping_previous

RESULT = "train.json"


def swept_keys(argv: list[str]) -> list[str]:
    """Keys the command line sweeps (``a=1,2``, ``b=range(3)``, ``c=choice(x,y)``), in order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    items = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(items)
    except Exception:  # Hydra has accepted this command line; be lenient about our reading
        return []
    return [o.get_key_element() for o in parsed if o.is_sweep_override()]


def job_label(job_overrides: list[str], swept: list[str]) -> str:
    """``key=value, ...`` of this job's values of the swept keys (all its overrides when the
    swept keys are unknown)."""
    chosen = {o.split("=", 1)[0].lstrip("+~"): o for o in job_overrides if "=" in o}
    picked = [chosen[k] for k in swept if k in chosen]
    return ", ".join(picked or job_overrides)


def name_sweep_job(cfg: DictConfig) -> None:
    """In a ``--multirun`` job: W&B ``group`` = the sweep (``<task>-<sweep dir name>``) and the
    run's ``name`` = its task and swept values, unless the config sets them itself."""
    if not in_multirun():
        return
    from hydra.core.hydra_config import HydraConfig

    wandb = (cfg.get("logger") or {}).get("wandb")
    if not isinstance(wandb, DictConfig):
        return
    hydra = HydraConfig.get()
    label = job_label(list(hydra.overrides.task), swept_keys(sys.argv[1:]))
    if wandb.get("group") is None:
        wandb.group = f"{cfg.task_name}-{Path(str(hydra.sweep.dir)).name}"
    if wandb.get("name") in (None, cfg.task_name):  # the default: every job named alike
        wandb.name = f"{cfg.task_name} {label}".strip()


def write_result(result: dict[str, Any], output_dir: str | Path) -> Path | None:
    """``<run dir>/train.json``: the job's overrides, final metrics, checkpoint and time (an
    earlier one, from a resumed run, is kept as ``train.1.json``). Rank zero only."""
    if is_secondary_process() or not result["trainer"].is_global_zero:
        return None
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    record = {"overrides": overrides, **result["metrics"], "seconds": result["seconds"],
              "last_ckpt": result["last_ckpt"], "output_dir": str(result["output_dir"])}
    path = Path(output_dir) / RESULT
    write_keeping_previous(path, json.dumps(record, indent=2) + "\n")
    return path
