"""Start-up checks of a distillation run (``tarflow-train experiment=demo_distill
distill.teacher=CKPT``): the teacher, the pairs, the student and the sampling callback, before any
pair is drawn or any record is written."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tarflow.app.checks.common import checkpoint_file
from tarflow.app.runs import is_secondary_process
from tarflow.model import TarFlowConfig, describe_checkpoint
from tarflow.model.student import StudentConfig
from tarflow.sampling.settings import parse_sampler

# Keys of the TarFlow module that mean nothing to a student: the experiment sets them null.
UNUSED_MODULE_KEYS = ("model", "noise", "label_drop", "speed_terms")


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def check_distill(cfg: DictConfig, *, sampling: DictConfig | None,
                  check_fid, check_run_dir) -> TarFlowConfig:
    """Refuse a distillation config that cannot work; returns the teacher's config.

    ``check_fid`` and ``check_run_dir`` are the training checks' own (shared, not copied).
    """
    teacher = checkpoint_file("distill.teacher", cfg.distill.teacher,
                              "give the teacher's checkpoint, e.g. <run dir>/checkpoints/last.ckpt")
    summary = describe_checkpoint(teacher)
    if summary.kind != "tarflow":
        raise ValueError(f"distill.teacher {teacher} is itself a distilled student; distil "
                         f"from a TarFlow checkpoint")
    model = summary.config
    module = cfg.module
    set_keys = [k for k in UNUSED_MODULE_KEYS if module.get(k) not in (None, False)]
    if set_keys or module.get("compile"):
        raise ValueError(f"module.{(set_keys or ['compile'])[0]} does not apply to a student "
                         f"(distillation reads the teacher's pairs); set it to null")
    try:
        StudentConfig.from_dict(dict(_plain(module.get("student")) or {}))
    except (TypeError, ValueError) as err:
        raise ValueError(f"module.student: {err}") from None
    pairs = dict(_plain(cfg.distill.get("pairs")) or {})
    if not pairs.get("dir"):
        raise ValueError("distill.pairs.dir is not set: the folder of the pair set")
    for key in ("count", "val_count", "shard_size", "batch_size"):
        if key in pairs and int(pairs[key]) < 1:
            raise ValueError(f"distill.pairs.{key}={pairs[key]} must be >= 1")
    try:
        pair_sampler = parse_sampler(pairs.get("sampler"))
        pair_sampler.guidance.check(model.conditional)
    except ValueError as err:
        raise ValueError(f"distill.pairs.sampler: {err}") from None
    if pair_sampler.knobs.get("denoise"):
        raise ValueError("distill.pairs.sampler.denoise must be 0: pairs hold the flow's own "
                         "samples (self-denoising is not distilled)")
    if sampling is not None:
        settings = parse_sampler(_plain(sampling.get("sampler")))
        if settings.knobs.get("denoise"):
            raise ValueError("callbacks.sampling.sampler.denoise must be 0 for a student (it "
                             "has no likelihood to denoise with)")
        check_fid(sampling.get("fid_stats_path"), cfg.data.img_size, cfg.data.channels,
                  key="callbacks.sampling.fid_stats_path",
                  custom_extractor=sampling.get("extractor") is not None)
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None:
        path = checkpoint_file("ckpt_path", ckpt,
                               "resume with ckpt_path=<run dir>/checkpoints/last.ckpt")
        theirs = describe_checkpoint(path)
        if theirs.kind != "student" or not theirs.lightning:
            raise ValueError(f"ckpt_path {path} is not a student's training checkpoint; a "
                             f"distillation run resumes only its own last.ckpt")
        if (theirs.teacher or {}).get("config") != model.to_dict():
            raise ValueError(f"ckpt_path {path} is a student of another teacher "
                             f"({(theirs.teacher or {}).get('path')}) than {teacher}")
    if cfg.get("init_from") is not None:
        raise ValueError("init_from does not apply to distillation (the student starts fresh "
                         "or resumes with ckpt_path)")
    if not is_secondary_process():
        check_run_dir(Path(cfg.paths.output_dir), ckpt)
    return model
