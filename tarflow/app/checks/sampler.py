"""Start-up checks of a sampler config and of FID reference statistics, shared by
``tarflow-train`` (its sampling callback; :mod:`tarflow.app.checks.train`), ``tarflow-sample``
and ``tarflow-eval`` (:mod:`tarflow.app.checks.sample`)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tarflow.eval import FeatureStats, load_reference, reference_format
from tarflow.eval.inception import FEATURE_DIM
from tarflow.model import TarFlowConfig
from tarflow.sampling.settings import parse_sampler


def normalise_schedule(sampler: DictConfig | None) -> None:
    """Read ``sampler.schedule=[3-8-32-10]`` as the paper notation it is, and
    ``sampler.schedule={3:S8/zeros,else:S1}`` as the explicit form it is, in place.

    The shell strips the quotes of ``sampler.schedule="[3-8-32-10]"`` and Hydra then reads a
    one-element list ``['3-8-32-10']``; any other list cannot be a schedule. Likewise the
    explicit form ``{block:setting, ..., else:setting}`` (what tarflow-rank and the planner
    print) reaches us as a dict of block -> setting strings.
    """
    if not isinstance(sampler, DictConfig):
        return
    spec = sampler.get("schedule")
    if OmegaConf.is_dict(spec) and spec and all(
            (isinstance(k, int) or str(k).isdigit() or k == "else") and isinstance(v, str)
            for k, v in spec.items()):
        sampler.schedule = "{" + ", ".join(f"{k}:{v}" for k, v in spec.items()) + "}"
        return
    if not OmegaConf.is_list(spec):
        return
    items = list(sampler.schedule)
    if len(items) != 1 or not isinstance(items[0], str):
        raise ValueError(
            f"sampler.schedule={items} is a list; a schedule is one string such as "
            f"[7-8-32-10] (inside a list of sweep values quote it: "
            f"sampler.schedule='\"[7-8-32-10]\"')"
        )
    sampler.schedule = f"[{items[0]}]"


def check_sampler(sampler: dict | None, model: TarFlowConfig, *, guidance_must_work: bool) -> None:
    """Refuse a sampler config that cannot sample ``model`` (tolerance, schedule, guidance)."""
    sampler = dict(sampler or {})
    tol = float(sampler.get("tol") or 0.0)
    if not tol >= 0:  # also NaN; the sequential schedule would otherwise ignore it silently
        raise ValueError(f"sampler.tol={tol} must be >= 0 (0 = run to the exact fixed point)")
    try:
        settings = parse_sampler(sampler)
        if not settings.is_auto:
            settings.schedule.validate(model.num_blocks, model.num_patches)
        if guidance_must_work:
            settings.guidance.check(model.conditional)
    except ValueError as err:
        raise ValueError(
            f"sampler: {err} (model {model.tag}, N={model.num_patches} tokens, "
            f"conditional={model.conditional})"
        ) from None


def check_fid_reference(path: str | None, img_size: int, channels: int, *, key: str,
                        custom_extractor: bool = False) -> None:
    """Refuse FID reference statistics that cannot serve this run, before any work.

    Our own cache computed for another resolution would be overwritten mid-run; an external
    reference (official torchmetrics ``.pth``, plain ``mu``/``sigma`` ``.npz``) must be
    readable, of this resolution where its name says, and of Inception's 2048 features unless
    a custom extractor is configured; a ``.pth`` is never computed, so it must exist.
    """
    if not path:
        return
    fmt = reference_format(path)
    if fmt is None:
        if Path(path).suffix == ".pth":
            raise FileNotFoundError(
                f"{key}={path} does not exist; a .pth reference (torchmetrics FID state dict) "
                f"is read, never computed: give an existing file or an .npz path to cache")
        return
    if fmt != "tarflow-npz":
        reference = load_reference(path, expect={"img_size": int(img_size)})
        if not custom_extractor and reference.num_features != FEATURE_DIM:
            raise ValueError(f"{key}={path} holds {reference.num_features}-d features; "
                             f"Inception FID needs {FEATURE_DIM}")
        return
    try:
        meta = FeatureStats.load(path).meta
    except Exception:  # unreadable caches are recomputed by the callback, with a warning
        return
    want = {"img_size": int(img_size), "channels": int(channels)}
    wrong = [
        f"{k}={meta[k]} (this run: {v})" for k, v in want.items() if k in meta and int(meta[k]) != v
    ]
    if wrong:
        raise ValueError(
            f"FID statistics {path} were computed for {', '.join(wrong)}; delete "
            f"the file or set {key} to statistics of this resolution"
        )
