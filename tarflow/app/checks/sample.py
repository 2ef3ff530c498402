"""Start-up validation of ``tarflow-sample`` and ``tarflow-eval``: one function per command checks
the composed config against the checkpoint it names (read memory-mapped, no model is built)
before any dataset, sample, output file or ``.hydra`` record exists.

Without these checks ``num_samples=0`` wrote a summary with ``NaN`` (invalid JSON), ``batch_size=0``
ended in a ZeroDivisionError, a schedule naming a missing block failed only after the whole bits/dim
pass of ``tarflow-eval`` (whose result was then lost), and ``label=3`` on an unconditional model
was ignored. Each problem raises one ``ValueError`` naming the key; the CLIs print it as one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from tarflow.app.checks.common import check_device, check_dtype, checkpoint_file
from tarflow.app.checks.eval_inputs import check_adm_reference, check_ranks, check_samples
from tarflow.app.checks.paths import check_writable, expand_user_paths
from tarflow.app.checks.sampler import check_fid_reference, check_sampler, normalise_schedule
from tarflow.app.distributed import World
from tarflow.app.sample_outputs import check_out_dir
from tarflow.app.sample_shards import file_fingerprint, set_identity
from tarflow.conf import CONFIG_DIR
from tarflow.model import CheckpointSummary, describe_checkpoint, weights_mismatch
from tarflow.model.autoencoder import locate, resolve_autoencoder
from tarflow.model.checkpoint import mismatch_error
from tarflow.model.loading import pick_device
from tarflow.model.space import make_space

FORMATS = ("png", "npz", "both")


@dataclass
class SampleCheck:
    """What :func:`check_sample_config` found: the checkpoint, and on rank 0 the set's identity
    and the recorded job that ``if_exists=resume`` continues (None: a fresh job)."""

    summary: CheckpointSummary
    identity: dict[str, Any] | None = None
    resumed: dict[str, Any] | None = None


def check_sample_config(cfg: DictConfig, world: World | None = None) -> SampleCheck:
    """Refuse a ``tarflow-sample`` config that cannot work (see the module doc).

    Also normalises ``sampler.schedule`` (a list from an unquoted ``[...]``) in place. Only rank
    0 of a launch (``world``) checks the output folder (the others would see rank 0's files).
    """
    world = world or World()
    _check_keys(cfg, "sample")
    expand_user_paths(cfg)
    check_writable("out_dir", cfg.out_dir, folder=True)
    summary = _checkpoint(cfg)
    check_autoencoder(summary, cfg.get("autoencoder_path"))
    model = summary.config
    n = _at_least(cfg, "num_samples", 1)
    if world.size > n:
        raise ValueError(f"num_samples={n} is fewer than the {world.size} ranks of this launch: "
                         f"each rank needs at least one sample; start fewer processes")
    _at_least(cfg, "batch_size", 1)
    _at_least(cfg, "shard_size", 1)
    check_device(cfg.get("device"))
    check_dtype(cfg.get("dtype"))
    fmt = str(cfg.get("format", "png"))
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} must be one of {FORMATS}")
    grid_size = _at_least(cfg, "grid_size", 0)
    normalise_schedule(cfg.sampler)
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True)
    check_sampler(sampler, model, guidance_must_work=True)
    label = cfg.get("label")
    if label is not None:
        if not model.conditional:
            raise ValueError(f"label={label} but the model of {summary.path} is unconditional; "
                             f"drop label")
        if not 0 <= int(label) < model.num_classes:
            raise ValueError(f"label={label} is outside the model's classes 0..."
                             f"{model.num_classes - 1}")
    probe_from_record(cfg, summary)
    if not world.is_main:
        return SampleCheck(summary)
    identity = set_identity(
        checkpoint=file_fingerprint(summary.path), sampler=sampler, seed=int(cfg.seed),
        num_samples=n, label=None if label is None else int(label),
        dtype=str(cfg.get("dtype", "float32")), device_type=pick_device(cfg.get("device")).type)
    resumed = check_out_dir(Path(cfg.out_dir), if_exists=str(cfg.get("if_exists", "refuse")),
                            identity=identity, fmt=fmt, grid_size=grid_size)
    return SampleCheck(summary, identity, resumed)


def probe_from_record(cfg: DictConfig, summary: CheckpointSummary) -> None:
    """``probe.dataset: null`` ranks the blocks on the data the checkpoint records it was
    trained on (as validation did), when that data is here: in memory (demo, fake) or under a
    root that exists. Otherwise the probe stays null and the model's own sequential samples
    are the probe, which costs a sequential sampling pass."""
    recorded, probe = summary.data, cfg.get("probe")
    if probe is None or probe.get("dataset") or not recorded or not recorded.get("name"):
        return
    root = recorded.get("root")
    if root is not None and not Path(str(root)).exists():
        return
    with open_dict(probe):
        probe.dataset = recorded["name"]
        probe.root = root if probe.get("root") is None else probe.root
        if not probe.get("dataset_kwargs"):
            probe.dataset_kwargs = dict(recorded.get("dataset_kwargs") or {})


def check_eval_config(cfg: DictConfig, world: World | None = None) -> CheckpointSummary | None:
    """Refuse a ``tarflow-eval`` config that cannot work, and fill in the evaluation data from
    the checkpoint's record when ``data.name`` is not given (see :func:`resolve_data`).

    With ``samples=PATH`` the images are read, not drawn: the checkpoint is optional (it then
    only names the dataset and, if ``bpd.enabled``, is scored for bits/dim); without one,
    ``data.name`` names the reference dataset and bits/dim is skipped.

    Returns:
        The checkpoint's summary (None: ``samples=`` without a checkpoint).
    """
    _check_keys(cfg, "eval")
    expand_user_paths(cfg)
    check_writable("out_dir", cfg.out_dir, folder=True)
    world = world or World()
    from_file = check_samples(cfg)
    if from_file is not None and not cfg.get("ckpt_path"):
        summary = None
        if not cfg.data.get("name"):
            raise ValueError(f"samples={cfg.samples} without ckpt_path: name the reference "
                             f"dataset with data.name=... (or give ckpt_path=)")
    else:
        summary = _checkpoint(cfg)
        check_autoencoder(summary, cfg.get("autoencoder_path"))
    bpd = bool(cfg.bpd.enabled) and summary is not None
    if not bpd and not cfg.fid.enabled:
        raise ValueError("bpd.enabled and fid.enabled are both false: nothing to evaluate")
    check_device(cfg.get("device"))
    check_dtype(cfg.get("dtype"))
    if bpd:
        _at_least(cfg, "data.batch_size", 1)
        if cfg.data.get("max_images") is not None:
            _at_least(cfg, "data.max_images", 1)
    if cfg.fid.enabled:
        # A covariance needs at least two samples on each side.
        n = from_file[0] if from_file else _at_least(cfg, "fid.num_samples", 2)
        check_ranks(world, n, "samples" if from_file else "fid.num_samples")
        _at_least(cfg, "fid.reference_size", 2)
        _at_least(cfg, "fid.batch_size", 1)
        _at_least(cfg, "fid.feature_batch_size", 1)
        if from_file is None:
            normalise_schedule(cfg.sampler)
            check_sampler(OmegaConf.to_container(cfg.sampler, resolve=True), summary.config,
                          guidance_must_work=True)
    if summary is not None:
        resolve_data(cfg, summary)
    if cfg.fid.enabled:
        shape = eval_image_shape(summary, from_file)
        path = fid_stats_path(cfg, shape)
        check_adm_reference(path, shape[1], shape[0])
        check_fid_reference(path, shape[1], shape[0], key="fid.stats_path",
                            custom_extractor=bool(cfg.fid.get("extractor")))
    return summary


def eval_image_shape(summary: CheckpointSummary | None,
                     from_file: tuple[int, tuple[int, int, int]] | None) -> tuple[int, int, int]:
    """(C, H, W) of the images scored: the samples file's, else the checkpoint's (a samples
    file of another resolution than the checkpoint's is refused)."""
    if from_file is None:
        return image_shape(summary)
    shape = from_file[1]
    if summary is not None and image_shape(summary)[1] != shape[1]:
        raise ValueError(f"samples holds {shape[1]}x{shape[2]} images but {summary.path} draws "
                         f"{image_shape(summary)[1]}px ones: give that checkpoint's samples")
    return shape


def image_shape(summary: CheckpointSummary) -> tuple[int, int, int]:
    """(C, H, W) of the checkpoint's images: a latent model's are its autoencoder's, not its
    latents' (read from the record; nothing is loaded)."""
    return make_space(summary.config, summary.autoencoder).image_shape


def check_autoencoder(summary: CheckpointSummary, path: str | None) -> None:
    """A latent checkpoint's autoencoder must be on this machine, at its recorded path or at
    ``autoencoder_path`` (a copy with the same weights); a pixel checkpoint takes no path."""
    if summary.autoencoder is None:
        if path:
            raise ValueError(f"autoencoder_path={path} but {summary.path} is a pixel model "
                             f"(it records no autoencoder); drop autoencoder_path")
        return
    locate(resolve_autoencoder(summary.autoencoder), path or None)


def fid_stats_path(cfg: DictConfig, shape: tuple[int, int, int]) -> str:
    """``fid.stats_path`` with the checkpoint's image ``{img_size}`` and ``{channels}``."""
    return str(cfg.fid.stats_path).format(img_size=shape[1], channels=shape[0])


def resolve_data(cfg: DictConfig, summary: CheckpointSummary) -> None:
    """Evaluate on the data the checkpoint was trained on unless told otherwise.

    ``data.name: null`` takes the recorded dataset (name, root, dataset options); a named
    dataset other than the recorded one is refused unless ``data.allow_mismatch`` is set.
    Files without a record (official ``.pth``, ``.pt``, older checkpoints) need ``data.name``.
    """
    recorded, data = summary.data, cfg.data
    if data.get("name") is None and recorded is None:
        raise ValueError(
            f"{summary.path} does not record the dataset it was trained on; name the "
            f"evaluation data with data.name=... (and data.root=... for data on disk)"
        )
    if recorded is None:
        return
    name = data.get("name") or recorded.get("name")
    if name != recorded.get("name") and not data.get("allow_mismatch", False):
        raise ValueError(
            f"data.name={name} but {summary.path} was trained on {recorded.get('name')} "
            f"(root {recorded.get('root')}); drop data.name to evaluate on the training data, "
            f"or set data.allow_mismatch=true to evaluate on another dataset on purpose"
        )
    if name != recorded.get("name"):
        return
    with open_dict(data):
        data.name = name
        if data.get("root") is None:
            data.root = recorded.get("root")
        if not data.get("dataset_kwargs"):
            data.dataset_kwargs = dict(recorded.get("dataset_kwargs") or {})


# ----------------------------------------------------------------------------- pieces
def _checkpoint(cfg: DictConfig) -> CheckpointSummary:
    if cfg.get("ckpt_path") in (None, ""):
        raise ValueError("ckpt_path is required: ckpt_path=<run dir>/checkpoints/last.ckpt")
    if not Path(str(cfg.ckpt_path)).expanduser().exists():
        # The wording the loader used before these checks, which scripts may look for.
        raise FileNotFoundError(f"checkpoint not found: {cfg.ckpt_path}")
    path = checkpoint_file("ckpt_path", cfg.ckpt_path, "give an official .pth, .pt or .ckpt")
    summary = describe_checkpoint(path)
    # The loader's own check and message, on shapes only, before any record or work. A
    # distilled student's tensors are its own network's, not a TarFlow's: its loader checks them.
    if summary.kind == "student":
        return summary
    if problems := weights_mismatch(summary.config, summary.state):
        raise mismatch_error(path.name, summary.config, problems)
    return summary


def _at_least(cfg: DictConfig, key: str, low: int) -> int:
    value = OmegaConf.select(cfg, key)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value} must be an integer >= {low}") from None
    if number < low or number != value:
        raise ValueError(f"{key}={value} must be an integer >= {low}")
    return number






def _check_keys(cfg: DictConfig, command: str) -> None:
    """Refuse top-level keys the command does not read (``+model=tiny`` would be ignored)."""
    primary = OmegaConf.load(Path(CONFIG_DIR) / f"{command}.yaml")
    groups = {key for entry in primary.get("defaults", []) if isinstance(entry, DictConfig)
              for key in entry}
    known = (set(primary) - {"defaults"}) | groups | {"hydra"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(
            f"tarflow-{command} has no {', '.join(unknown)} settings (they would be ignored: "
            f"the model comes from ckpt_path); see tarflow-{command} --help"
        )
