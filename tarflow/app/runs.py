"""Run directories: their ``.hydra`` records, whether they hold a run, and resuming one.

Records. Hydra writes ``.hydra/{config,hydra,overrides}.yaml`` into the run directory as soon as a
job starts, before the task has seen its config, and a second job in the same directory replaces
them. Our ``tarflow/conf/hydra/default.yaml`` turns that off (``output_subdir: null``) and opens
the job's log file lazily (``delay: true``); each CLI calls :func:`save_records` once its start-up
checks have passed. So a refused command leaves an existing run directory byte for byte as it was
(and removes a new one it created, :func:`remove_new_run_dir`), and a
later command in the same directory (a resume, a second sampling job) writes ``.hydra/1/``,
``.hydra/2/``, ... next to the earlier records instead of over them.

Resuming. ``tarflow-train ckpt_path=<run>/checkpoints/last.ckpt hydra.run.dir=<run>`` is composed
by Hydra from that command line alone, which would drop the overrides the run was started with
(a run of 1 epoch x 5 batches would resume as the default 45 x 50). :func:`resume_argv` runs in
``main()`` before Hydra: it reads the overrides recorded by the run that wrote the checkpoint and
puts the new command line on top (for the same key the new value wins; a fine-tune's
``init_from`` is not restored: the weights come from the checkpoint). Composing again from
those overrides, rather than loading the recorded ``config.yaml``, keeps group choices such as
``model=tiny`` working; :func:`config_changes` then compares the result with the recorded config,
so edits of the YAML files since are reported too.

DDP: every process of a multi-process launch (torchrun, srun, Lightning's own re-launch of the
command) runs ``main()``. Only the first process writes records (:func:`is_secondary_process`);
the others compose the same config because merging a command line into overrides that already
contain it changes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tarflow.files import atomic_write

RECORDS = ".hydra"
# Environment variables that launchers set to a process's rank (node, global or local).
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
# Hydra flags that take the next argument as their value.
_FLAGS_WITH_VALUE = frozenset(("--cfg", "-c", "--package", "-p", "--config-path", "-cp",
                               "--config-name", "-cn", "--config-dir", "-cd",
                               "--experimental-rerun"))


def is_secondary_process() -> bool:
    """True in every process of a multi-process launch but the first (rank 0 of node 0)."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) != 0:
            return True
    return False


# ----------------------------------------------------------------------------------- records
def records_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The run's record directories, oldest first: ``.hydra``, then ``.hydra/1``, ``.hydra/2``."""
    top = Path(run_dir) / RECORDS
    found = [top] if (top / "config.yaml").is_file() else []
    numbered = [p for p in top.glob("*") if p.name.isdigit() and (p / "config.yaml").is_file()]
    return found + sorted(numbered, key=lambda p: int(p.name))


def _next_records_dir(run_dir: Path) -> Path:
    top = run_dir / RECORDS
    if not (top / "config.yaml").exists():
        return top
    taken = [int(p.name) for p in top.glob("*") if p.name.isdigit()]
    return top / str(max(taken, default=0) + 1)


def write_keeping_previous(path: Path, text: str) -> Path | None:
    """Write ``path`` atomically; an earlier file of that name is kept as ``<stem>.<k>.<ext>``
    (the next free k), so repeating a job into the same folder never loses its results.

    Returns where the earlier file went (None when there was none).
    """
    kept = None
    if path.exists():
        k = 1
        while (kept := path.with_name(f"{path.stem}.{k}{path.suffix}")).exists():
            k += 1
        os.replace(path, kept)
    atomic_write(path, text)
    return kept


def save_records(cfg: DictConfig, extra: dict[str, Any] | None = None) -> Path | None:
    """Write Hydra's three records of this job (and ``extra`` YAML files) into a fresh records
    directory of the job's output dir; returns it (None outside a Hydra job, in a secondary
    process, or where Hydra was asked to write its records itself)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or is_secondary_process():
        return None
    hydra = HydraConfig.get()
    if hydra.output_subdir is not None:
        return None
    target = _next_records_dir(Path(hydra.runtime.output_dir))
    target.mkdir(parents=True, exist_ok=True)
    files = {"config.yaml": cfg, "hydra.yaml": HydraConfig.instance().cfg,
             "overrides.yaml": hydra.overrides.task, **(extra or {})}
    for name, content in files.items():
        node = content if OmegaConf.is_config(content) else OmegaConf.create(content)
        # Another process may read a record while it is written (DDP ranks restoring a resume).
        atomic_write(target / name, OmegaConf.to_yaml(node))
    return target


def holds_run(run_dir: str | os.PathLike) -> list[str]:
    """What marks ``run_dir`` as a training run's directory (empty: nothing, or not a run)."""
    run = Path(run_dir)
    marks = []
    if records_dirs(run):
        marks.append(f"{RECORDS}/ records")
    if any((run / "checkpoints").glob("*.ckpt")):
        marks.append("checkpoints")
    if any((run / "csv").glob("*/metrics.csv")):
        marks.append("CSV metrics")
    return marks


# ------------------------------------------------------------------------ refused commands
# The run directory and its parents that did not exist when this command started (deepest
# first): Hydra creates them before the task runs, so a refused command removes them again.
_NEW_DIRS: list[Path] = []
# Why this command's hydra.run.dir cannot be written (empty: it can), noted by NewRunDir.
_RUN_DIR_ERROR: list[str] = []


def run_dir_error(*, forget: bool = False) -> str | None:
    """Why ``hydra.run.dir`` cannot be written, when :class:`NewRunDir` found it so
    (``forget``: and forget it: a new command starts)."""
    found = _RUN_DIR_ERROR[0] if _RUN_DIR_ERROR else None
    if forget:
        _RUN_DIR_ERROR.clear()
    return found


def missing_dirs(path: str | os.PathLike) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    out, here = [], Path(path).absolute()
    while not here.exists() and here != here.parent:
        out.append(here)
        here = here.parent
    return out


class NewRunDir(Callback):
    """Hydra callback (``tarflow/conf/hydra/default.yaml``): notes which directories of
    ``hydra.run.dir`` this command will create, before Hydra creates them."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from tarflow.app.checks.paths import check_writable

        _NEW_DIRS.clear()
        _RUN_DIR_ERROR.clear()
        try:
            run_dir = str(config.hydra.run.dir)
        except Exception:  # an unresolvable run dir: Hydra reports it itself
            return
        try:
            # A run dir that is a file, lies under one or in a read-only folder: Hydra would
            # end in a traceback creating it (ours would writing the records). Hydra only warns
            # about a callback's error, so it is noted for tarflow.app.errors to report.
            check_writable("hydra.run.dir", run_dir, folder=True)
        except ValueError as err:
            _RUN_DIR_ERROR.append(str(err))
            return
        _NEW_DIRS[:] = missing_dirs(run_dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _NEW_DIRS.clear()  # a sweep's failing job is reported by Hydra; its folder stays
        _RUN_DIR_ERROR.clear()


def remove_new_run_dir() -> list[Path]:
    """Remove the directories this command created for its run, while they are empty (a
    refused command leaves no empty ``outputs/<task>/<time>/`` behind). Never removes a
    directory that existed before the command or that holds anything. Returns the removed."""
    removed = []
    for path in _NEW_DIRS:
        try:
            path.rmdir()  # fails on a non-empty directory: nothing written is ever deleted
        except OSError:
            break
        removed.append(path)
    _NEW_DIRS.clear()
    return removed


# ----------------------------------------------------------------------------------- resuming
@dataclass(frozen=True)
class Resume:
    """A resume found on the command line, and the run whose config it restores.

    Attributes:
        checkpoint: ``ckpt_path`` as given.
        records: the restored run's latest records directory.
        restored: the overrides recorded there.
        new: the command line's own task overrides (recorded as such in ``resume.yaml``).
        argv: the command line Hydra gets: restored overrides that the new ones do not
            replace, then the original arguments.
    """

    checkpoint: str
    records: Path
    restored: list[str]
    new: list[str]
    argv: list[str] = field(default_factory=list)


def _overrides(argv: Iterable[str]) -> list[str]:
    """The ``key=value`` / ``~key`` items of a command line (not flags or their values)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in _FLAGS_WITH_VALUE
        elif "=" in arg or arg.startswith("~"):
            out.append(arg)
    return out


def _key(override: Any) -> str:
    return override.get_key_element()


def _is_hydra(override: Any) -> bool:
    key = override.key_or_group
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def _value(parsed: list[Any], key: str) -> str | None:
    for item in reversed(parsed):
        if _key(item) == key and not item.is_delete():
            value = item.value()
            return None if value is None else str(value)
    return None


def resume_argv(argv: list[str]) -> Resume | None:
    """The restored command line of a resume (see the module doc), or None when ``argv`` does not
    resume a run with records. Reads files only; a line Hydra cannot parse is left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from tarflow.lit.wandb_utils import checkpoint_run_dir

    parser = OverridesParser.create()
    items = _overrides(argv)
    try:
        parsed = parser.parse_overrides(items)
    except Exception:  # Hydra reports the bad override itself, in its own words
        return None
    checkpoint = _value(parsed, "ckpt_path")
    if checkpoint in (None, "null", ""):
        return None
    candidates = [checkpoint_run_dir(checkpoint), _value(parsed, "hydra.run.dir")]
    for run in candidates:
        found = records_dirs(run) if run else []
        if found:
            records = found[-1]
            break
    else:
        return None
    restored = list(OmegaConf.load(records / "overrides.yaml") or [])
    new = [text for text, item in zip(items, parsed, strict=True) if not _is_hydra(item)]
    # A resume takes its weights from the checkpoint; the run's init_from only seeded its start
    # (restored, it would collide with ckpt_path and stop the resume of every fine-tune).
    replaced = {_key(item) for item in parsed} | {"init_from"}
    try:
        kept = [text for text, item in zip(restored, parser.parse_overrides(restored), strict=True)
                if _key(item) not in replaced]
    except Exception:  # a record Hydra cannot read any more: let Hydra say so
        kept = restored
    return Resume(checkpoint, records, restored, new, [*kept, *argv])


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat if flat or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def config_changes(before: DictConfig, after: DictConfig,
                   ignore: tuple[str, ...] = ("ckpt_path", "init_from")
                   ) -> dict[str, list[Any]]:
    """``{dotted key: [before, after]}`` of two unresolved configs (absent keys: ``None``)."""
    old = _flatten(OmegaConf.to_container(before, resolve=False))
    new = _flatten(OmegaConf.to_container(after, resolve=False))
    changes = {}
    for key in sorted(set(old) | set(new)):
        if key in ignore or old.get(key) == new.get(key):
            continue
        changes[key] = [old.get(key), new.get(key)]
    return changes


def describe_changes(changes: dict[str, list[Any]], limit: int = 12) -> str:
    """``a.b: 1 -> 3; c: x -> y`` (the first ``limit`` keys, then a count)."""
    parts = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in list(changes.items())[:limit]]
    if len(changes) > limit:
        parts.append(f"and {len(changes) - limit} more (see resume.yaml)")
    return "; ".join(parts)

