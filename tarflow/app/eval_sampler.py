"""Which sampler ``tarflow-eval`` and ``tarflow-sample`` use: by default, the one validation used.

The demo run logs FID 43 (GS-Jacobi with guidance 1 and self-denoising); ``tarflow-eval`` with
its config's default sampler (sequential, neither) measured 122 on the same checkpoint, and said
nothing about the difference. Training now records its validation sampler in the checkpoint
(the sampling callback's state); older runs have it in their ``.hydra/config.yaml``.
:func:`choose_sampler` puts it in place of the config's sampler unless the command line chooses
one (``sampler=...``, ``sampler.*=...`` or an ``hparams_search`` sweep), and says which was used
and which validation used, in the output and in ``eval.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tarflow.app.runs import records_dirs
from tarflow.lit.wandb_utils import checkpoint_run_dir
from tarflow.model.checkpoint import read_file
from tarflow.sampling.knobs import KNOBS

# Command-line keys that choose the sampler themselves.
_CHOOSERS = ("sampler", "hparams_search")


def recorded_validation_sampler(ckpt_path: str | Path) -> tuple[dict[str, Any] | None, str]:
    """The sampler the checkpoint's validation rounds used, and where that was found.

    Looks in the checkpoint (the sampling callback's state, written since issue 22), then in the
    records of the run that wrote it (``<run dir>/.hydra/config.yaml``). Anything unreadable
    counts as not recorded: the checkpoint's own checks report a broken file.
    """
    try:
        checkpoint = read_file(ckpt_path, mmap=True)
    except Exception:
        checkpoint = {}
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith("SamplingCallback") and isinstance(state, dict):
            if isinstance(state.get("sampler"), dict) and state["sampler"]:
                return dict(state["sampler"]), "the checkpoint"
    run = checkpoint_run_dir(ckpt_path)
    for records in reversed(records_dirs(run) if run else []):
        try:
            config = OmegaConf.load(records / "config.yaml")
            node = OmegaConf.select(config, "callbacks.sampling.sampler")
            if node is not None:
                return OmegaConf.to_container(node, resolve=True), f"the run's {records.name}"
        except Exception:
            continue
    return None, "not recorded"


def chosen_on_command_line(overrides: list[str]) -> bool:
    """Whether the command line picks or changes the sampler."""
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key.split(".", 1)[0].split("/", 1)[0] in _CHOOSERS:
            return True
    return False


def task_overrides() -> list[str]:
    """The command line's overrides of the running Hydra job (none outside one)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def describe(sampler: dict[str, Any] | None) -> str:
    """``gs_jacobi_auto (schedule auto, guidance 1.0, denoise 1.0, ...)`` in one line."""
    if not sampler:
        return "none"
    shown = ", ".join(f"{k} {sampler[k]}" for k in ("schedule", "tol", *KNOBS) if k in sampler)
    return f"{sampler.get('name', 'sampler')} ({shown})"


def choose_sampler(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Put the validation sampler in ``cfg.sampler`` unless the command line chose one.

    Returns:
        What ``eval.json`` records: ``sampler_source`` (``validation`` or ``config``),
        ``validation_sampler`` (None when not recorded) and where it was found.
    """
    validation, where = recorded_validation_sampler(cfg.ckpt_path)
    source = "config"
    if validation is not None and not chosen_on_command_line(overrides):
        current = OmegaConf.to_container(cfg.sampler, resolve=True)
        # Keys this version knows; values as validation had them.
        cfg.sampler = OmegaConf.create({**current, **{k: v for k, v in validation.items()
                                                      if k in current}})
        source = "validation"
    return {"sampler_source": source, "validation_sampler": validation,
            "validation_sampler_from": where}


def sampler_lines(info: dict[str, Any], used: dict[str, Any]) -> list[str]:
    """What the output says about the samplers before the FID samples are drawn."""
    validation = info["validation_sampler"]
    if info["sampler_source"] == "validation":
        return [f"sampler: {describe(used)}, as in validation (recorded in "
                f"{info['validation_sampler_from']}); sampler=... chooses another"]
    lines = [f"sampler: {describe(used)}, from the command line / the command's config"]
    if validation is None:
        lines.append("validation sampler: not recorded with this checkpoint")
    elif validation != {k: used.get(k) for k in validation}:
        lines.append(f"validation sampled with {describe(validation)}: FID differs between "
                     f"samplers (guidance and denoising lower it)")
    return lines
