"""W&B logger factory: offline when no key is configured, resumable ids, CSV fallback.

``tarflow/conf/logger/wandb.yaml`` targets :func:`wandb_logger` instead of ``WandbLogger``
directly because three decisions need code:

* ``offline: auto`` resolves to online only when ``WANDB_MODE`` says so, or an API key is set
  (``WANDB_API_KEY``) or stored in ``~/.netrc``; otherwise the run is written offline under
  ``<save_dir>/wandb/offline-run-*`` with one warning, and can be uploaded later with
  ``wandb sync``.
* The run id is derived from the run directory (:func:`run_id_for`), so a run resumed in the same
  directory continues the same W&B run (``resume="allow"``). When resuming from a checkpoint
  stored at ``<run dir>/checkpoints/*.ckpt`` the id comes from that ``<run dir>``, wherever the
  new run writes.
* When an online run cannot start (no network, W&B down, a rejected key) the same run is started
  offline instead, with one warning. When W&B cannot start at all (no package, bad settings, a
  crashed service) training goes on with a :class:`~lightning.pytorch.loggers.CSVLogger` under
  ``<save_dir>/wandb_fallback`` and a warning.
"""

from __future__ import annotations

import hashlib
import netrc
import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger

_WARNED_OFFLINE = False


def _netrc_has_key(host: str) -> bool:
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not path.is_file():
        return False
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def resolve_offline(offline: bool | str | None) -> bool:
    """True/False pass through; "auto"/None decides from the environment (see module doc)."""
    global _WARNED_OFFLINE
    if isinstance(offline, bool):
        return offline
    if offline not in (None, "auto"):
        raise ValueError(f"logger offline={offline!r}: expected true, false or 'auto'")
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):  # (disabled is kept by wandb_logger)
        return True
    if mode == "online":
        return False
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    if os.environ.get("WANDB_API_KEY") or _netrc_has_key(host):
        return False
    if not _WARNED_OFFLINE:
        warnings.warn(
            "W&B: no API key configured (WANDB_API_KEY or ~/.netrc); logging offline. "
            "Upload later with `wandb sync <run dir>/wandb/offline-run-*`.",
            stacklevel=2,
        )
        _WARNED_OFFLINE = True
    return True


def checkpoint_run_dir(ckpt_path: str | os.PathLike | None) -> Path | None:
    """``<run dir>`` for a checkpoint at ``<run dir>/checkpoints/<name>.ckpt``, else None."""
    if not ckpt_path or str(ckpt_path) in ("last", "best", "hpc", "registry"):
        return None
    path = Path(ckpt_path).expanduser().resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else None


def run_id_for(run_dir: str | os.PathLike) -> str:
    """A stable W&B id for a run directory: readable prefix + hash of the absolute path."""
    path = Path(run_dir).expanduser().resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in path.name)[-40:]
    return f"{stem}-{digest}".strip("-")


def wandb_logger(
    *,
    save_dir: str,
    project: str = "tarflow",
    name: str | None = None,
    entity: str | None = None,
    offline: bool | str | None = "auto",
    id: str | None = None,
    resume: str = "allow",
    resume_from: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    log_model: bool = False,
    start: bool = True,
    fallback: bool = True,
    **kwargs: Any,
) -> Logger:
    """A ``WandbLogger`` (or a ``CSVLogger`` if W&B fails and ``fallback``).

    Args:
        save_dir: run directory; W&B writes ``<save_dir>/wandb/``.
        project: W&B project.
        name: display name of the run.
        entity: W&B team or user (None = the key's default).
        offline: True, False or "auto" (see :func:`resolve_offline`).
        id: explicit run id; None derives it from ``resume_from``'s run dir or ``save_dir``.
        resume: passed to ``wandb.init`` ("allow" continues an existing id).
        resume_from: the checkpoint being resumed (``ckpt_path``), if any.
        group: W&B group (e.g. a sweep name).
        tags: W&B tags.
        log_model: upload checkpoints as artifacts (forced off offline).
        start: start the run now, so a broken W&B fails here (and falls back), not mid-fit.
        fallback: on failure, warn and return a CSVLogger instead of raising.
        **kwargs: more ``wandb.init`` arguments.
    """
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    # A bad `offline` value is a configuration mistake: raise it rather than fall back.
    is_offline = resolve_offline(offline)
    if os.environ.get("WANDB_MODE", "").lower() == "disabled":
        # WandbLogger(offline=True) would rewrite WANDB_MODE to "dryrun" and log after all.
        is_offline, kwargs = False, {**kwargs, "mode": "disabled"}
        start_online = False
    else:
        start_online = not is_offline
    init = dict(
        name=name,
        save_dir=save_dir,
        project=project,
        entity=entity,
        id=id or run_id_for(checkpoint_run_dir(resume_from) or save_dir),
        resume=resume,
        group=group or None,
        tags=list(tags or []),
        **kwargs,
    )
    try:
        return _start_wandb(init, offline=is_offline, log_model=log_model, start=start)
    except Exception as err:  # any W&B failure; training must not die for a logger
        failure = err
    if start_online:
        # Online start failed (no network, W&B down, a rejected key): the same run can still be
        # written offline and uploaded later, which keeps the dashboards complete.
        warnings.warn(
            f"W&B could not start online ({type(failure).__name__}: {failure}); logging "
            f"offline instead. Upload later with `wandb sync {save_dir}/wandb/offline-run-*`.",
            stacklevel=2,
        )
        _reset_wandb()
        try:
            return _start_wandb(init, offline=True, log_model=False, start=start)
        except Exception as err:
            failure = err
    if not fallback:
        raise failure
    warnings.warn(
        f"W&B logger failed to start ({type(failure).__name__}: {failure}); "
        f"falling back to CSV logging in {save_dir}/wandb_fallback",
        stacklevel=2,
    )
    # Its own folder: the csv logger group writes <save_dir>/csv/version_<k> beside it.
    return CSVLogger(save_dir=save_dir, name="wandb_fallback")


def _start_wandb(init: dict[str, Any], *, offline: bool, log_model: bool, start: bool) -> Logger:
    """Build a ``WandbLogger`` and, if ``start``, start its run (rank zero only)."""
    from lightning.pytorch.loggers import WandbLogger

    if offline:
        # Explicit: once a W&B session exists in this process it ignores WANDB_MODE, which is
        # how WandbLogger(offline=True) asks for offline mode.
        init = {**init, "mode": "offline"}
    logger = WandbLogger(offline=offline, log_model=log_model and not offline, **init)
    if start:
        _ = logger.experiment  # only rank zero starts a run; other ranks get a dummy
    return logger


def _reset_wandb() -> None:
    """Forget a failed online start: W&B's service keeps the half-created run (its id then
    counts as "in use"), so it is shut down and the offline retry starts a fresh one."""
    try:
        import wandb

        wandb.teardown()
    except Exception:  # nothing to reset, or the service is already gone
        pass


def finish_wandb(loggers: list[Logger]) -> None:
    """Close any W&B run so a later run in the same process starts fresh (not reused).

    A failure to close (a crashed W&B service) only warns: the training it logged is done.
    """
    for logger in loggers:
        run = getattr(logger, "_experiment", None)
        if run is None or not hasattr(run, "finish"):
            continue
        try:
            run.finish()
        except Exception as err:
            warnings.warn(
                f"W&B run could not be closed cleanly ({type(err).__name__}: {err}); its "
                f"offline files may need `wandb sync`",
                stacklevel=2,
            )
