"""Start-up validation of ``tarflow-sample`` and ``tarflow-eval``: one function per command checks
the composed config against the checkpoint it names (read memory-mapped, no model is built)
before any dataset, sample, output file or ``.hydra`` record exists.

Without these checks ``num_samples=0`` wrote a summary with ``NaN`` (invalid JSON), ``batch_size=0``
ended in a ZeroDivisionError, a schedule naming a missing block failed only after the whole bits/dim
pass of ``tarflow-eval`` (whose result was then lost), and ``label=3`` on an unconditional model
was ignored. Each problem raises one ``ValueError`` naming the key; the CLIs print it as one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from tarflow.app.checks.common import check_device, check_dtype, checkpoint_file
from tarflow.app.checks.paths import check_writable, expand_user_paths
from tarflow.app.checks.sampler import check_fid_reference, check_sampler, normalise_schedule
from tarflow.app.sample_outputs import check_out_dir
from tarflow.conf import CONFIG_DIR
from tarflow.model import CheckpointSummary, describe_checkpoint, weights_mismatch
from tarflow.model.autoencoder import locate, resolve_autoencoder
from tarflow.model.checkpoint import mismatch_error
from tarflow.model.space import make_space

FORMATS = ("png", "npz", "both")


def check_sample_config(cfg: DictConfig) -> CheckpointSummary:
    """Refuse a ``tarflow-sample`` config that cannot work (see the module doc).

    Also normalises ``sampler.schedule`` (a list from an unquoted ``[...]``) in place.

    Returns:
        The checkpoint's summary.
    """
    _check_keys(cfg, "sample")
    expand_user_paths(cfg)
    check_writable("out_dir", cfg.out_dir, folder=True)
    summary = _checkpoint(cfg)
    check_autoencoder(summary, cfg.get("autoencoder_path"))
    model = summary.config
    n = _at_least(cfg, "num_samples", 1)
    _at_least(cfg, "batch_size", 1)
    first = _at_least(cfg, "first_index", 0)
    check_device(cfg.get("device"))
    check_dtype(cfg.get("dtype"))
    fmt = str(cfg.get("format", "png"))
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} must be one of {FORMATS}")
    _at_least(cfg, "grid_size", 0)
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
    check_out_dir(Path(cfg.out_dir), if_exists=str(cfg.get("if_exists", "refuse")),
                  first=first, count=n, job=sample_job(cfg, summary.path))
    probe_from_record(cfg, summary)
    return summary


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


def sample_job(cfg: DictConfig, checkpoint: Path) -> dict[str, Any]:
    """What defines a sample set (written to the summary; ``if_exists=append`` compares it)."""
    return {"checkpoint": str(checkpoint.resolve()),
            "sampler": OmegaConf.to_container(cfg.sampler, resolve=True), "seed": int(cfg.seed),
            "label": cfg.get("label"), "dtype": str(cfg.get("dtype", "float32")),
            "format": str(cfg.get("format", "png"))}


def check_eval_config(cfg: DictConfig) -> CheckpointSummary:
    """Refuse a ``tarflow-eval`` config that cannot work, and fill in the evaluation data from
    the checkpoint's record when ``data.name`` is not given (see :func:`resolve_data`).

    Returns:
        The checkpoint's summary.
    """
    _check_keys(cfg, "eval")
    expand_user_paths(cfg)
    check_writable("out_dir", cfg.out_dir, folder=True)
    summary = _checkpoint(cfg)
    check_autoencoder(summary, cfg.get("autoencoder_path"))
    if not cfg.bpd.enabled and not cfg.fid.enabled:
        raise ValueError("bpd.enabled and fid.enabled are both false: nothing to evaluate")
    check_device(cfg.get("device"))
    check_dtype(cfg.get("dtype"))
    if cfg.bpd.enabled:
        _at_least(cfg, "data.batch_size", 1)
        if cfg.data.get("max_images") is not None:
            _at_least(cfg, "data.max_images", 1)
    if cfg.fid.enabled:
        # A covariance needs at least two samples on each side.
        _at_least(cfg, "fid.num_samples", 2)
        _at_least(cfg, "fid.reference_size", 2)
        _at_least(cfg, "fid.batch_size", 1)
        _at_least(cfg, "fid.feature_batch_size", 1)
        normalise_schedule(cfg.sampler)
        check_sampler(OmegaConf.to_container(cfg.sampler, resolve=True), summary.config,
                      guidance_must_work=True)
    resolve_data(cfg, summary)
    if cfg.fid.enabled:
        channels, side, _ = image_shape(summary)
        check_fid_reference(fid_stats_path(cfg, image_shape(summary)), side, channels,
                            key="fid.stats_path", custom_extractor=bool(cfg.fid.get("extractor")))
    return summary


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
    # The loader's own check and message, on shapes only, before any record or work.
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
