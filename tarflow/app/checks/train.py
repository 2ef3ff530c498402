"""Start-up validation of a composed training config: fail before any logger, checkpoint, W&B run
or ``.hydra`` record exists, with one clear message (bad input must cost seconds, not a run).

The sampler checks shared with ``tarflow-sample`` and ``tarflow-eval`` live in
:mod:`tarflow.app.checks.sampler`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from lightning.pytorch.callbacks import WeightAveraging
from omegaconf import DictConfig, OmegaConf

from tarflow.app.checks.common import checkpoint_file
from tarflow.app.checks.distill import check_distill
from tarflow.app.checks.paths import expand_user_paths
from tarflow.app.checks.sampler import check_fid_reference, check_sampler, normalise_schedule
from tarflow.app.runs import holds_run, is_secondary_process
from tarflow.lit.callbacks.sampling import SamplingCallback
from tarflow.lit.fsdp import is_fsdp
from tarflow.lit.module import compile_options
from tarflow.lit.wandb_utils import checkpoint_run_dir
from tarflow.model import (
    CheckpointSummary,
    TarFlowConfig,
    describe_checkpoint,
    weights_mismatch,
)
from tarflow.model.autoencoder import AutoencoderRecord, resolve_autoencoder
from tarflow.model.checkpoint import read_file, split_checkpoint
from tarflow.model.sharded import is_sharded_checkpoint
from tarflow.sampling.speed_losses import parse_speed_terms

# Values of ckpt_path that Lightning resolves itself instead of reading a file.
_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")


def check_config(cfg: DictConfig) -> TarFlowConfig:
    """Refuse settings that cannot work before any data is read or any run is started.

    Without this, a schedule naming block 7 of a 4-block model or guidance on an unconditional
    model would only fail at the first validation round, after an epoch of training, and a
    resume with the wrong model size would fail after the loggers had started. Each problem
    raises one ``ValueError`` / ``FileNotFoundError`` naming the config key, which
    ``tarflow-train`` prints as one line.

    Returns:
        The model's :class:`TarFlowConfig`.
    """
    expand_user_paths(cfg)  # ckpt_path=~/...: Lightning's resume does not expand it
    _check_no_missing_values(cfg)
    if cfg.get("distill") is not None:  # a student of a trained teacher: its own checks
        return check_distill(cfg, sampling=_sampling_callback_node(cfg),
                             check_fid=check_fid_reference, check_run_dir=_check_run_dir)
    model = _model_config(cfg)
    autoencoder = _check_latent(cfg, model)
    if "module" in cfg:
        compile_options(_plain(cfg.module.get("compile")))  # names the bad option itself
        check_speed_terms(cfg, model)
    normalise_schedule(cfg.get("sampler"))
    sampling = _sampling_callback_node(cfg)
    if sampling is not None:
        normalise_schedule(sampling.get("sampler"))
        check_sampler(_plain(sampling.get("sampler")), model, guidance_must_work=True)
        check_fid_reference(sampling.get("fid_stats_path"), cfg.data.img_size,
                            cfg.data.channels, key="callbacks.sampling.fid_stats_path",
                            custom_extractor=sampling.get("extractor") is not None)
    if (cfg.get("final_samples") or {}).get("enabled", False):
        # The final grid drops guidance that cannot act (write_sample_grid), so only the
        # schedule and the knobs' ranges are checked for it.
        check_sampler(_plain(cfg.get("sampler")), model, guidance_must_work=False)
    ckpt, init = cfg.get("ckpt_path"), cfg.get("init_from")
    if ckpt is not None and init is not None:
        raise ValueError("ckpt_path (resume a run) and init_from (start a new run from weights) "
                         "exclude each other; give one")
    fsdp = _check_strategy(cfg)
    if ckpt is not None:
        _check_resume(ckpt, model, fsdp, autoencoder, cfg.get("trainer"))
    if init is not None:
        _check_init_from(init, model)
    if not is_secondary_process():  # other ranks start after the first one wrote its files
        _check_run_dir(Path(cfg.paths.output_dir), ckpt)
    return model


def _check_no_missing_values(cfg: DictConfig) -> None:
    """Keys the config marks as needed must be set: ``???`` values (``cfg.get`` reads one as
    None, so the run would go on without it) and, unless resuming, the ``required`` list (an
    experiment's way to say it, since its ``???`` merged over a default is dropped)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if cfg.get("ckpt_path") is None:
        missing += [key for key in cfg.get("required") or []
                    if key not in missing and OmegaConf.select(cfg, key, default=None) is None]
    if missing:
        keys = ", ".join(missing)
        raise ValueError(f"mandatory value(s) not set: {keys} ({cfg.get('task_name')} needs "
                         f"them); give each on the command line, e.g. {missing[0]}=<value>")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _check_strategy(cfg: DictConfig) -> bool:
    """Refuse EMA under FSDP (see :mod:`tarflow.lit.fsdp`); returns whether FSDP is used."""
    strategy = cfg.get("trainer", {}).get("strategy")
    if isinstance(strategy, DictConfig) and "_target_" in strategy:
        try:
            strategy = get_class(str(strategy._target_))
        except Exception:  # an unimportable target fails later with its own message
            return False
    if not is_fsdp(strategy):
        return False
    for name, node in (cfg.get("callbacks") or {}).items():
        if not (isinstance(node, DictConfig) and "_target_" in node):
            continue
        try:
            cls = get_class(str(node._target_))
        except Exception:
            continue
        if isinstance(cls, type) and issubclass(cls, WeightAveraging):
            raise ValueError(
                f"callbacks.{name} ({cls.__name__}) cannot run under FSDP: Lightning's weight "
                f"averaging keeps a full unsharded copy and updates it parameter by parameter "
                f"from the sharded module; train without it: add '~callbacks.{name}'")
    return True


def _model_node(cfg: DictConfig) -> DictConfig:
    return cfg.module.model if "module" in cfg and "model" in cfg.module else cfg.model


def _model_config(cfg: DictConfig) -> TarFlowConfig:
    fields = dict(_plain(_model_node(cfg)))
    fields.pop("autoencoder", None)  # a latent model's autoencoder: checked by _check_latent
    known = {f.name for f in dataclasses.fields(TarFlowConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown model field(s) {unknown}; TarFlowConfig has {sorted(known)}")
    return TarFlowConfig(**fields)  # raises a ValueError naming e.g. img_size and patch_size


def _check_latent(cfg: DictConfig, model: TarFlowConfig) -> AutoencoderRecord | None:
    """A latent model's autoencoder must exist and fit the model and the data; its metrics
    are not the pixel ones a checkpoint callback might monitor. Returns its record."""
    spec = _plain(_model_node(cfg).get("autoencoder"))
    data = cfg.get("data") or {}
    if spec is None:
        if data.get("latent_size") is not None:
            raise ValueError("the data config is a latent one (data.latent_size is set) but "
                             "model.autoencoder is null: choose a latent model config")
        return None
    record = resolve_autoencoder(spec)  # names a missing path and how to get the weights
    if model.in_channels != record.latent_channels:
        raise ValueError(f"model.in_channels={model.in_channels} but the autoencoder's latents "
                         f"have {record.latent_channels} channels (set data.latent_channels="
                         f"{record.latent_channels})")
    side = data.get("img_size")
    if side is not None and int(side) != model.img_size * record.downsample:
        raise ValueError(f"data.img_size={side} but the model's latents are {model.img_size} "
                         f"wide and the autoencoder downsamples by {record.downsample}; set "
                         f"data.latent_size={int(side) // record.downsample}")
    if data.get("channels") is not None and int(data.channels) != record.image_channels:
        raise ValueError(f"data.channels={data.channels} but the autoencoder takes "
                         f"{record.image_channels}-channel images")
    for name, node in (cfg.get("callbacks") or {}).items():
        monitor = node.get("monitor") if isinstance(node, DictConfig) else None
        if monitor in ("val/nll", "val/bpd"):
            raise ValueError(f"callbacks.{name}.monitor={monitor}, but a latent model logs "
                             f"val/latent_nll instead (nats per latent dimension); set "
                             f"callbacks.{name}.monitor=val/latent_nll")
    return record


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


# ----------------------------------------------------------------------------- checkpoints
def _check_resume(ckpt: Any, model: TarFlowConfig, fsdp: bool,
                  autoencoder: AutoencoderRecord | None = None,
                  trainer: DictConfig | None = None) -> None:
    """``ckpt_path`` must be a Lightning checkpoint of this very architecture (and, for a
    latent model, of the same autoencoder); a sharded one resumes under FSDP only (no other
    strategy reads a directory)."""
    if str(ckpt) in _LIGHTNING_CKPT_NAMES or "://" in str(ckpt):
        return
    path = checkpoint_file("ckpt_path", ckpt,
                           "resume with ckpt_path=<run dir>/checkpoints/last.ckpt")
    if is_sharded_checkpoint(path) and not fsdp:
        raise ValueError(
            f"ckpt_path {path} is a sharded (FSDP) checkpoint: resume it with trainer=fsdp, or "
            f"start a new run from its weights with init_from={path}")
    summary = describe_checkpoint(path)
    if not summary.lightning:
        raise ValueError(
            f"ckpt_path {path} holds weights only, not a training run to resume (an official "
            f".pth or a .pt file); start a new run from its weights with init_from={path}"
        )
    different = _config_differences(summary, model)
    theirs = summary.autoencoder and AutoencoderRecord.from_dict(summary.autoencoder).identity()
    ours = autoencoder and autoencoder.identity()
    if theirs != ours:
        different.append(f"model.autoencoder: {_describe_ae(autoencoder)} (checkpoint: "
                         f"{_describe_ae(summary.autoencoder)})")
    if different:
        raise ValueError(
            f"ckpt_path {path} does not fit this run's model: {', '.join(different)}; resume "
            f"with the checkpoint's settings, or start a new run from its weights with "
            f"init_from={path}"
        )
    _check_not_finished(path, summary, trainer or {})


def _check_not_finished(path: Path, summary: CheckpointSummary, trainer: Any) -> None:
    """A resume that would train nothing (the checkpoint already reached the run's end) is
    refused, rather than exiting 0 with empty metrics over the run's records."""
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
    if max_steps is not None and int(max_steps) >= 0 and summary.global_step is not None:
        if summary.global_step >= int(max_steps):
            raise ValueError(
                f"ckpt_path {path} is already trained to max_steps={summary.global_step} "
                f"(trainer.max_steps={max_steps}); raise trainer.max_steps to continue")
    if max_epochs is not None and int(max_epochs) >= 0 and summary.epochs_done is not None:
        if summary.epochs_done >= int(max_epochs):
            raise ValueError(
                f"ckpt_path {path} is already trained to max_epochs={summary.epochs_done} "
                f"(trainer.max_epochs={max_epochs}); raise trainer.max_epochs to continue")


def _config_differences(summary: CheckpointSummary, model: TarFlowConfig) -> list[str]:
    theirs, ours = summary.config.to_dict(), model.to_dict()
    return [f"model.{key}={ours[key]} (checkpoint: {theirs[key]})"
            for key in ours if key in theirs and theirs[key] != ours[key]]


def _describe_ae(record: AutoencoderRecord | dict | None) -> str:
    if record is None:
        return "none (pixels)"
    record = record if isinstance(record, AutoencoderRecord) else AutoencoderRecord.from_dict(
        record)
    return f"{record.path} (fingerprint {record.fingerprint}, scale {record.scaling_factor:g})"


def _check_init_from(init: Any, model: TarFlowConfig) -> None:
    """``init_from`` must hold weights whose keys and shapes fit the configured model."""
    path = checkpoint_file("init_from", init, "give an official .pth, a .pt or a .ckpt file")
    # Only the tensors: a file without a stored config need not be inferable to fit.
    state, stored = split_checkpoint(read_file(path, mmap=True))
    problems = weights_mismatch(model, state)
    # Options no tensor shape shows: the same weights under another scale or head split are
    # another flow, so a file that records them must agree (an official .pth records none).
    problems += [f"it was trained with model.{key}={stored[key]}, the config has "
                 f"model.{key}={getattr(model, key)}"
                 for key in ("scale", "head_dim")
                 if stored and key in stored and stored[key] != getattr(model, key)]
    if problems:
        raise ValueError(f"init_from {path} does not fit the model {model.tag}: "
                         + " | ".join(problems))


def _check_run_dir(output_dir: Path, ckpt: Any) -> None:
    """A new run must not write into another run's directory (its records, checkpoints and
    metrics would be mixed); a resume may only continue the run that wrote its checkpoint."""
    marks = holds_run(output_dir)
    if not marks:
        return
    owner = checkpoint_run_dir(ckpt) if ckpt is not None else None
    if ckpt is None:
        raise ValueError(
            f"hydra.run.dir {output_dir} already holds a run ({', '.join(marks)}); resume it "
            f"with ckpt_path={output_dir / 'checkpoints' / 'last.ckpt'}, or choose a new "
            f"hydra.run.dir"
        )
    if owner is not None and owner != output_dir.resolve():
        raise ValueError(
            f"hydra.run.dir {output_dir} holds another run than the one that wrote ckpt_path "
            f"{ckpt}; resume into hydra.run.dir={owner} or a new directory"
        )


def check_speed_terms(cfg: DictConfig, model: TarFlowConfig) -> None:
    """``module.speed_terms``: kinds, weights >= 0, block ids of this model, k / every >= 1
    (the module would refuse them too, but only after the loggers and run dir exist)."""
    parse_speed_terms(_plain(cfg.module.get("speed_terms")), model)
