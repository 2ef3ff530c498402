"""Reading and writing TarFlow weights: official ``.pth`` files, Lightning checkpoints, our own.

Every path goes through ``torch.load(weights_only=True)`` (a pickle that would run code is refused)
and ends in ``load_state_dict(strict=True)`` after our own key/shape comparison, so a wrong file
fails with one :class:`CheckpointError` that names the offending keys instead of a deep traceback.
"""

from __future__ import annotations

import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tarflow.files import atomic_torch_save
from tarflow.model.config import TarFlowConfig
from tarflow.model.sharded import read_sharded
from tarflow.model.student import NOT_A_FLOW, student_info

if TYPE_CHECKING:
    from tarflow.model.tarflow import TarFlow

# Official names: {dataset}_model_{P}_{Ch}_{T}_{K}_{sigma:.2f}.pth
_OFFICIAL_NAME = re.compile(r"_model_(\d+)_(\d+)_(\d+)_(\d+)_([0-9.]+)\.pth$")
# Prefixes under which our Lightning module (and common wrappers) store the network.
_PREFIXES = ("net.", "model.", "module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A file that is not a loadable TarFlow checkpoint; the message says why and where."""


def read_file(path: str | Path, map_location: str | torch.device = "cpu", *,
              mmap: bool = False) -> dict:
    """torch.load with weights_only=True, turning every failure into one CheckpointError.

    Args:
        path: the file, or a sharded checkpoint directory (:mod:`tarflow.model.sharded`).
        map_location: where tensors go.
        mmap: map the file instead of reading it (zip-format files only; others are read):
            start-up checks look at a few shapes of a checkpoint that may be gigabytes.
    """
    path = Path(path).expanduser()  # every loader reads through here: "~/x.pth" works in all
    if path.is_dir():  # a sharded training checkpoint (trainer=fsdp) is a directory
        try:
            return read_sharded(path, map_location)
        except Exception as err:
            raise CheckpointError(f"{path} is a directory, not a readable sharded checkpoint "
                                  f"(meta.pt + .metadata + .distcp files): {_reason(err)}"
                                  ) from None
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many types: UnpicklingError, RuntimeError, EOFError
        if "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path} contains pickled Python objects that weights_only=True refuses to load "
                f"(they could run code); re-save it as a plain state dict. Detail: "
                f"{_reason(err)}"
            ) from None
        # Random bytes also fail inside the weights-only unpickler, whose message then tells
        # the user to retry with weights_only=False: wrong advice for a file that is no
        # checkpoint at all, so only the unpickler's own reason is kept.
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, or not written by torch.save): "
            f"{_reason(err)}"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _reason(err: Exception) -> str:
    """The first line of torch's own diagnosis, without its weights_only advice."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    line = line.split(". ", 1)[0]  # torch appends advice after the first sentence
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def split_checkpoint(obj: dict) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state_dict of the bare network, stored config dict or None) from any supported layout."""
    config = None
    if "tarflow_config" in obj:  # our plain format
        config = dict(obj["tarflow_config"])
    hparams = obj.get("hyper_parameters")
    if config is None and isinstance(hparams, dict) and isinstance(hparams.get("model"), dict):
        config = dict(hparams["model"])  # our Lightning module stores the config under "model"
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict):
        raise CheckpointError("the checkpoint's 'state_dict' entry is not a dict")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for prefix in _PREFIXES:
        if any(k.startswith(prefix + "blocks.") for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    return sd, config


def infer_config(sd: dict[str, torch.Tensor], *, name: str | None = None,
                 **overrides) -> TarFlowConfig:
    """Recover the architecture from tensor shapes (and an official file name, if given).

    Shapes fix T, K (per block for a deep-shallow stack), Ch (and a wider deep block), D, N, the
    class count (and whether only the deep block is conditional) and the MLP expansion.
    D = C * P^2 leaves C and P ambiguous: an official file name gives P; otherwise RGB (C = 3) is
    tried first, then 1 and 4. ``head_dim`` and ``scale`` cannot be seen in any shape: they
    default to the paper's 64 and exp.
    """
    present = sorted({int(k.split(".")[1]) for k in sd
                      if k.startswith("blocks.") and k.endswith(".proj_in.weight")})
    if not present or f"blocks.{present[0]}.pos_embed" not in sd:
        some = ", ".join(sorted(sd)[:5]) or "(no tensors)"
        raise CheckpointError(f"not a TarFlow state dict: no 'blocks.<b>.proj_in.weight' and "
                              f"'pos_embed' keys (first keys: {some})")
    # A deep-shallow stack shows per block: its depth (0 = an identity block, no keys at all),
    # the deep (last) block's width, and which blocks carry a class embedding.
    T = 1 + present[-1]
    depths = [1 + max((int(k.split(".")[3]) for k in sd
                       if k.startswith(f"blocks.{b}.attn_blocks.")), default=-1)
              for b in range(T)]
    first = present[0]
    Ch, D = sd[f"blocks.{first}.proj_in.weight"].shape
    deep = sd[f"blocks.{T - 1}.proj_in.weight"].shape[0]
    N = sd[f"blocks.{first}.pos_embed"].shape[0]
    embeds = {b: sd[f"blocks.{b}.class_embed"] for b in present
              if f"blocks.{b}.class_embed" in sd}
    classes = next(iter(embeds.values())).shape[0] if embeds else 0
    hidden = sd.get(f"blocks.{first}.attn_blocks.0.mlp.main.0.weight")
    found = dict(channels=Ch, num_blocks=T, num_classes=classes,
                 layers_per_block=depths[0] if len(set(depths)) == 1 else depths)
    if deep != Ch:
        found["deep_channels"] = deep
    if embeds and set(embeds) == {T - 1} and len(present) > 1:
        found["cond_deep_only"] = True
    match = _OFFICIAL_NAME.search(name or "")
    if match:
        # The official name states P, Ch, T and K: taken from it, one wrong tensor is reported
        # as that one, not as every tensor of an architecture inferred from it.
        found.update(patch_size=int(match.group(1)), channels=int(match.group(2)),
                     num_blocks=int(match.group(3)), layers_per_block=int(match.group(4)),
                     noise_std=float(match.group(5)))
        if found["num_blocks"] != T or found["channels"] != Ch:
            found.pop("deep_channels", None)
            found.pop("cond_deep_only", None)
    if hidden is not None:
        found["expansion"] = max(1, hidden.shape[0] // found["channels"])
    side = math.isqrt(N)
    if side * side != N:
        raise CheckpointError(f"pos_embed has N={N} positions, which is not a square grid")
    P = overrides.get("patch_size", found.get("patch_size"))
    C = overrides.get("in_channels")
    if P is not None and C is None and D % (P * P) == 0:
        C = D // (P * P)
    for c in ([C] if C else [3, 1, 4]):
        p = P if P else math.isqrt(D // c)
        if c * p * p == D:
            found["in_channels"], found["patch_size"] = c, p
            break
    else:
        raise CheckpointError(f"token size D={D} is not C*P^2 for C in (3, 1, 4); pass "
                              f"in_channels= and patch_size= explicitly")
    found["img_size"] = side * found["patch_size"]
    return TarFlowConfig(**{**found, **overrides})


def compare_state_dicts(model_sd: dict, file_sd: dict) -> list[str]:
    """Human-readable differences between the model's keys/shapes and the file's."""
    problems = []
    missing = sorted(set(model_sd) - set(file_sd))
    unexpected = sorted(set(file_sd) - set(model_sd))
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}")
    shapes = [f"{k}: file {tuple(file_sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in model_sd.items() if k in file_sd and file_sd[k].shape != v.shape]
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:8])}")
    return problems


def _config_of(sd: dict, stored: dict | None, name: str | None, where: str,
               overrides: dict) -> TarFlowConfig:
    """The architecture a file stores, else the one its shapes (and official name) imply."""
    try:
        if stored is not None:
            return TarFlowConfig(**{**stored, **overrides})
        return infer_config(sd, name=name, **overrides)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: cannot build a TarFlow: {err}") from None


def build_from_checkpoint(cls: type[TarFlow], source: str | Path | dict, *,
               map_location: str | torch.device = "cpu", **overrides) -> TarFlow:
    """Build a TarFlow from a checkpoint file or an in-memory dict and load it strictly."""
    name = None
    if isinstance(source, (str, Path)):
        name = Path(source).name
        obj = read_file(source, map_location)
    else:
        obj = source
    where = name or "the given state dict"
    if student_info(obj) is not None:
        raise CheckpointError(f"{where} is a distilled student, not a TarFlow ({NOT_A_FLOW}); "
                              f"load it with tarflow.model.loading.load_for_sampling")
    sd, stored = split_checkpoint(obj)
    config = _config_of(sd, stored, name, where, overrides)
    model = cls(config)
    problems = compare_state_dicts(model.state_dict(), sd)
    if problems:
        raise mismatch_error(where, config, problems)
    model.load_state_dict(sd, strict=True)
    return model.to(map_location)


def mismatch_error(where: str, config: TarFlowConfig, problems: list[str]) -> CheckpointError:
    """The one message for a file whose tensors do not fit the architecture it implies."""
    return CheckpointError(f"{where} does not match a TarFlow {config.tag} (img "
                           f"{config.img_size}, classes {config.num_classes}): "
                           + " | ".join(problems))


@dataclass(frozen=True)
class CheckpointSummary:
    """What a checkpoint file holds, read (memory-mapped) without building a model.

    Start-up checks use it to refuse a file before any work: the wrong kind of file for a key,
    an architecture that does not fit the run's config, a dataset other than the one asked for.

    Attributes:
        path: the file.
        lightning: a Lightning training checkpoint (resumable: optimiser, counters, callbacks),
            as opposed to bare weights (official ``.pth``, our ``.pt``).
        config: the architecture, as stored in the file or else inferred from shapes.
        state: the bare network's tensors (memory-mapped where the format allows).
        data: the dataset identity recorded at training time (``name``, ``root``,
            ``img_size``, ``channels``, ``num_classes``, ``dataset_kwargs``), or None.
        weights: "ema" or "raw" for our Lightning checkpoints, else None.
        autoencoder: a latent model's autoencoder record (``AutoencoderRecord.to_dict()``),
            or None for a pixel model.
        epochs_done: whole epochs a Lightning checkpoint has trained (its fit loop's
            processed epochs: an end-of-epoch save counts its epoch, a mid-epoch one does not).
        global_step: optimiser steps a Lightning checkpoint has taken.
        kind: "tarflow", or "student" for a distilled student (``tarflow.model.student``;
            ``config`` is then its teacher's, ``teacher`` where it came from).
    """

    path: Path
    lightning: bool
    config: TarFlowConfig
    state: dict[str, torch.Tensor]
    data: dict | None = None
    weights: str | None = None
    autoencoder: dict | None = None
    epochs_done: int | None = None
    global_step: int | None = None
    kind: str = "tarflow"
    teacher: dict | None = None


def _epochs_done(obj: dict) -> int | None:
    """Processed epochs in a Lightning checkpoint's fit-loop state (None: no such state)."""
    try:
        current = obj["loops"]["fit_loop"]["epoch_progress"]["current"]
        return max(int(current["processed"]), int(current["completed"]))
    except (KeyError, TypeError, ValueError):
        return None


def describe_checkpoint(path: str | Path, **overrides) -> CheckpointSummary:
    """Read a checkpoint's kind, architecture and recorded dataset (see CheckpointSummary).

    Raises:
        CheckpointError: a missing, unreadable or non-TarFlow file.
    """
    path = Path(path)
    obj = read_file(path, "cpu", mmap=True)
    sd, stored = split_checkpoint(obj)
    config = _config_of(sd, stored, path.name, path.name, overrides)
    meta = obj.get("tarflow") if isinstance(obj.get("tarflow"), dict) else {}
    hparams = obj.get("hyper_parameters") if isinstance(obj.get("hyper_parameters"), dict) else {}
    data = meta.get("data") or hparams.get("data")
    autoencoder = meta.get("autoencoder") or hparams.get("autoencoder")
    step = obj.get("global_step")
    student = student_info(obj)
    return CheckpointSummary(path, "pytorch-lightning_version" in obj, config, sd,
                             dict(data) if isinstance(data, dict) else None, meta.get("weights"),
                             dict(autoencoder) if isinstance(autoencoder, dict) else None,
                             _epochs_done(obj), None if step is None else int(step),
                             "tarflow" if student is None else "student",
                             None if student is None else student[2])


def load_weights(model: TarFlow, source: str | Path) -> str | None:
    """Copy the network weights of any supported file into ``model`` (strict; fine-tuning).

    Only keys and shapes must fit: the file's own config, if any, is not consulted. A
    Lightning checkpoint gives its ``state_dict``, i.e. the EMA weights when it was trained
    with EMA.

    Returns:
        "ema" or "raw" for our Lightning checkpoints (which weights were taken), else None.

    Raises:
        CheckpointError: unreadable file, or keys/shapes that do not fit ``model``.
    """
    obj = read_file(source, "cpu", mmap=True)
    state, _ = split_checkpoint(obj)
    problems = compare_state_dicts(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"{source} does not fit the model {model.config.tag}: "
                              + " | ".join(problems))
    model.load_state_dict(state, strict=True)
    meta = obj.get("tarflow")
    return meta.get("weights") if isinstance(meta, dict) else None


def save_model(model: TarFlow, path: str | Path) -> Path:
    """Save config and weights; atomic and durable (:func:`tarflow.files.atomic_torch_save`)."""
    payload = {"tarflow_config": model.config.to_dict(), "state_dict": model.state_dict()}
    return atomic_torch_save(payload, path)
