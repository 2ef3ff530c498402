"""Wrong-type overrides, refused in one line before anything is written.

``tarflow-train trainer.max_epochs=abc`` used to reach Lightning as a string and fail 79 lines
deep (``'>' not supported between 'int' and 'str'``) after the run's records and a W&B run
existed. Hydra composes any value into any key, so the types are checked here, at start-up.

The schema is the config itself: the same config composed **without the command line's value
overrides** (only its group choices, e.g. ``experiment=img64_cond model=tiny``) gives every key's
default, and a key whose default is an integer must stay an integer, one whose default is a float
must stay a number. Keys whose default is null but which take a number when set, and the few
numeric keys that also take other values (``trainer.devices=auto``), are listed below: this
module is the one place that knows the types of the configs' values.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Numeric keys whose default is null (no type to derive): their type when set.
NULL_DEFAULT_TYPES: dict[str, type] = {
    "seed": int,
    "trainer.max_steps": int,
    "trainer.max_epochs": int,
    "trainer.limit_train_batches": float,  # an int counts batches, a float is a fraction
    "trainer.limit_val_batches": float,
    "trainer.val_check_interval": float,
    "trainer.gradient_clip_val": float,
    "trainer.check_val_every_n_epoch": int,
    "module.optim.warmup_steps": int,
    "data.val_batch_size": int,
    "data.max_images": int,
    "sampler.check_every": int,
    "sampler.auto.tough_iters": int,
    "sampler.auto.else_iters": int,
}
# Numeric keys that also take other values (what else they take, for the message).
FLEXIBLE: dict[str, tuple[tuple[type, ...], str]] = {
    "trainer.devices": ((int, list, str), "an integer, a list of device ids or 'auto'"),
    "trainer.fast_dev_run": ((int, bool), "true, false or a number of batches"),
}
# Groups whose values are not the run's settings.
_SKIP = ("hydra",)
_WHAT = {int: "an integer", float: "a number"}


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, resolved value)`` of every leaf; a value that does not resolve here (e.g.
    a mandatory ``???``) is left to the checks that read it."""
    if not isinstance(node, DictConfig):
        return
    for key in node.keys():
        dotted = f"{prefix}{key}"
        if not prefix and key in _SKIP:
            continue
        try:
            value = node[key]
        except Exception:
            continue
        if isinstance(value, DictConfig):
            yield from _leaves(value, dotted + ".")
        elif OmegaConf.is_list(value):
            yield dotted, OmegaConf.to_container(value, resolve=True)
        else:
            yield dotted, value


def expected_types(defaults: DictConfig) -> dict[str, type]:
    """``{dotted key: int | float}`` of every numeric leaf of ``defaults`` (bools excluded)."""
    types = dict(NULL_DEFAULT_TYPES)
    for key, value in _leaves(defaults):
        if isinstance(value, bool) or key in FLEXIBLE:
            continue
        if isinstance(value, int):
            types[key] = int
        elif isinstance(value, float):
            types[key] = float
    return types


def type_problem(key: str, value: Any, expected: type | None) -> str | None:
    """The one-line complaint about ``value`` at ``key``, or None when it fits."""
    if value is None:
        return None  # null: "use the library's default" for every numeric key here
    if key in FLEXIBLE:
        allowed, what = FLEXIBLE[key]
        # Lightning's strings: "auto", a count ("2", "-1") or device ids ("0,1").
        text_ok = not isinstance(value, str) or re.fullmatch(r"auto|-?\d+(,\d+)*,?", value)
        if isinstance(value, allowed) and text_ok:
            return None
        return f"{key} must be {what}, got {value!r}"
    if expected is None:
        return None
    fits = isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        fits = fits or isinstance(value, float)
    return None if fits else f"{key} must be {_WHAT[expected]}, got {value!r}"


def check_value_types(cfg: DictConfig, defaults: DictConfig) -> None:
    """Raise one ``ValueError`` naming the first key whose value has the wrong type.

    Args:
        cfg: the composed config the command will run with.
        defaults: the same config composed without the command line's value overrides.
    """
    types = expected_types(defaults)
    for key, value in _leaves(cfg):
        problem = type_problem(key, value, types.get(key))
        if problem:
            raise ValueError(problem)


def group_overrides(task_overrides: list[str], choices: dict[str, Any]) -> list[str]:
    """The command line's config-group choices (``experiment=img64_cond``, ``+foo=bar`` for a
    group), without its value overrides (``trainer.max_epochs=3``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(task_overrides)
    return [text for text, item in zip(task_overrides, parsed, strict=True)
            if item.key_or_group in choices and not item.is_delete()]


def check_job_types(cfg: DictConfig) -> None:
    """Inside a Hydra job: compose the job's config without its value overrides and refuse a
    value of the wrong type (:func:`check_value_types`). Outside one (tests, notebooks that
    build a config themselves) there is no command line to blame: nothing is checked."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    if not (HydraConfig.initialized() and GlobalHydra.instance().is_initialized()):
        return
    hydra = HydraConfig.get()
    overrides = group_overrides(list(hydra.overrides.task), dict(hydra.runtime.choices))
    defaults = compose(config_name=hydra.job.config_name, overrides=overrides)
    check_value_types(cfg, defaults)
