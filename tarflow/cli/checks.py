"""Start-up validation of a composed training config: fail before any logger, checkpoint or
W&B run exists, with one clear message (issue: bad configuration must cost seconds, not a run)."""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from tarflow.eval import FeatureStats
from tarflow.lit.callbacks.sampler_config import parse_sampler
from tarflow.lit.callbacks.sampling import SamplingCallback
from tarflow.model import Guidance, TarFlowConfig

# Values of ckpt_path that Lightning resolves itself instead of reading a file.
_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")


def check_config(cfg: DictConfig) -> TarFlowConfig:
    """Refuse settings that cannot work before any data is read or any run is started.

    Without this, a schedule naming block 7 of a 4-block model or guidance on an unconditional
    model would only fail at the first validation round, after an epoch of training. Each
    problem raises one ``ValueError`` / ``FileNotFoundError`` naming the config key, which
    ``tarflow-train`` prints as one line.

    Returns:
        The model's :class:`TarFlowConfig`.
    """
    model = _model_config(cfg)
    sampling = _sampling_callback_node(cfg)
    if sampling is not None:
        _check_sampler(_plain(sampling.get("sampler")), model, guidance_must_work=True)
        _check_fid_stats(sampling.get("fid_stats_path"), cfg.data)
    if (cfg.get("final_samples") or {}).get("enabled", False):
        # The final grid drops guidance that cannot act (write_sample_grid), so only the
        # schedule and the knobs' ranges are checked for it.
        _check_sampler(_plain(cfg.get("sampler")), model, guidance_must_work=False)
    _check_ckpt_path(cfg.get("ckpt_path"))
    return model


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _model_config(cfg: DictConfig) -> TarFlowConfig:
    node = cfg.module.model if "module" in cfg and "model" in cfg.module else cfg.model
    fields = _plain(node)
    known = {f.name for f in dataclasses.fields(TarFlowConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown model field(s) {unknown}; TarFlowConfig has {sorted(known)}")
    return TarFlowConfig(**fields)  # raises a ValueError naming e.g. img_size and patch_size


def _sampling_callback_node(cfg: DictConfig) -> DictConfig | None:
    """The configured SamplingCallback node (or a subclass's), if the run has one."""
    for node in (cfg.get("callbacks") or {}).values():
        if isinstance(node, DictConfig) and "_target_" in node:
            try:
                cls = get_class(str(node._target_))
            except Exception:  # an unimportable target fails later with its own message
                continue
            if isinstance(cls, type) and issubclass(cls, SamplingCallback):
                return node
    return None


def _check_sampler(sampler: dict | None, model: TarFlowConfig, *, guidance_must_work: bool) -> None:
    sampler = dict(sampler or {})
    tol = float(sampler.get("tol") or 0.0)
    if not tol >= 0:  # also NaN; the sequential schedule would otherwise ignore it silently
        raise ValueError(f"sampler.tol={tol} must be >= 0 (0 = run to the exact fixed point)")
    try:
        settings = parse_sampler(sampler)
        if not settings.is_auto:
            settings.schedule.validate(model.num_blocks, model.num_patches)
        knobs = settings.knobs
        guidance = Guidance(knobs["guidance"], knobs["attn_temp"], knobs["annealed"])
        if guidance_must_work:
            guidance.check(model.conditional)
    except ValueError as err:
        raise ValueError(
            f"sampler: {err} (model {model.tag}, N={model.num_patches} tokens, "
            f"conditional={model.conditional})"
        ) from None


def _check_fid_stats(path: str | None, data: DictConfig) -> None:
    """Cached FID statistics of another resolution would be overwritten mid-run: refuse them."""
    if not path or not Path(path).is_file():
        return
    try:
        meta = FeatureStats.load(path).meta
    except Exception:  # unreadable caches are recomputed by the callback, with a warning
        return
    want = {"img_size": int(data.img_size), "channels": int(data.channels)}
    wrong = [
        f"{k}={meta[k]} (this run: {v})" for k, v in want.items() if k in meta and int(meta[k]) != v
    ]
    if wrong:
        raise ValueError(
            f"FID statistics {path} were computed for {', '.join(wrong)}; delete "
            f"the file or set callbacks.sampling.fid_stats_path to statistics of "
            f"this resolution"
        )


def _check_ckpt_path(ckpt: Any) -> None:
    if ckpt is None or str(ckpt) in _LIGHTNING_CKPT_NAMES or "://" in str(ckpt):
        return
    path = Path(str(ckpt)).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"ckpt_path {path} {what}; resume with ckpt_path=<run dir>/checkpoints/last.ckpt"
        )
    # torch.save writes a zip archive; a truncated one has no central directory at its end.
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"ckpt_path {path} is not a readable checkpoint (truncated, or not "
            f"written by torch.save)"
        )
