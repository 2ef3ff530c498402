"""The official TarFlow file format (apple/ml-tarflow): what it can express, and how to write it.

An official checkpoint is a plain ``state_dict`` ``.pth`` named
``{dataset}_model_{P}_{Ch}_{T}_{K}_{sigma:.2f}.pth`` (ALGORITHMS.md §1). The official model
builds every block alike (K layers of width Ch, 64-wide heads, 4x MLP, a class embedding in every
block of a conditional model) from the numbers in that name, so a network whose blocks differ
(STARFlow's deep-shallow stacks), or whose head width, MLP expansion or other options differ from
TarFlow's, loads there wrongly or not at all. :func:`official_problems` says why a state dict
cannot be exported; it reads per-block shapes off the tensors, so it needs no config field that
a newer model may have added.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from tarflow.model.checkpoint import (
    CheckpointError,
    infer_config,
    read_file,
    split_checkpoint,
)
from tarflow.model.config import TarFlowConfig
from tarflow.model.tarflow import weights_mismatch

# What the official code hard-codes (its Model defaults, used by its sampling script).
OFFICIAL_HEAD_DIM = 64
OFFICIAL_EXPANSION = 4
# Config fields the official file name and shapes carry; any other field must keep TarFlow's
# default for the official model to compute the same function.
_SHAPE_FIELDS = ("img_size", "in_channels", "patch_size", "channels", "num_blocks",
                 "layers_per_block", "num_classes", "head_dim", "expansion", "noise_std")
_LAYER_KEY = re.compile(r"^blocks\.(\d+)\.attn_blocks\.(\d+)\.")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*$")


def official_name(dataset: str, config: TarFlowConfig) -> str:
    """``{dataset}_model_{P}_{Ch}_{T}_{K}_{sigma:.2f}.pth``, the official file name."""
    if not _DATASET_NAME.match(dataset):
        # "_model_" splits the name when it is read back: no underscores, no path separators.
        raise ValueError(f"dataset name {dataset!r} must be letters, digits, '.' or '-' "
                         f"(it becomes part of the official file name)")
    return (f"{dataset}_model_{config.patch_size}_{config.channels}_{config.num_blocks}_"
            f"{config.layers_per_block}_{config.noise_std:.2f}.pth")


def block_shapes(sd: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per forward block: transformer layers, width (proj_in), MLP hidden width, class embedding.

    Read from the tensors alone, so blocks of any depth or width (deep-shallow) are described.
    """
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
    layers: dict[int, set[int]] = defaultdict(set)
    for key in sd:
        match = _LAYER_KEY.match(key)
        if match:
            layers[int(match.group(1))].add(int(match.group(2)))
    shapes = []
    for b in blocks:
        proj_in = sd.get(f"blocks.{b}.proj_in.weight")
        hidden = sd.get(f"blocks.{b}.attn_blocks.0.mlp.main.0.weight")
        shapes.append({
            "block": b,
            "layers": len(layers[b]),
            "width": None if proj_in is None else int(proj_in.shape[0]),
            "hidden": None if hidden is None else int(hidden.shape[0]),
            "class_embed": f"blocks.{b}.class_embed" in sd,
        })
    return shapes


def _differ(shapes: list[dict[str, Any]], field: str, what: str) -> str | None:
    values = [s[field] for s in shapes]
    if len(set(values)) <= 1:
        return None
    per_block = ", ".join(f"{s['block']}: {s[field]}" for s in shapes)
    return f"blocks differ in {what} ({per_block}; forward block: value)"


def official_problems(sd: dict[str, torch.Tensor], config: dict[str, Any] | None) -> list[str]:
    """Why the official TarFlow model cannot express this network (empty when it can).

    Args:
        sd: the bare network's state dict (no ``net.`` prefix).
        config: the stored config dict, if the file has one (fields beyond the official ones
            must hold TarFlow's defaults).
    """
    shapes = block_shapes(sd)
    if not shapes:
        return ["no flow blocks in the state dict"]
    problems = [p for p in (
        _differ(shapes, "layers", "depth (transformer layers)"),
        _differ(shapes, "width", "width (proj_in channels)"),
        _differ(shapes, "hidden", "MLP width"),
        _differ(shapes, "class_embed", "class conditioning (class_embed present)"),
    ) if p]
    if problems:
        problems[0] += ("; the official model builds every block alike, so deep-shallow "
                        "(STARFlow) stacks have no official form")
        return problems
    first = shapes[0]
    if first["layers"] == 0:
        problems.append("blocks have no transformer layers")
    elif first["hidden"] != OFFICIAL_EXPANSION * first["width"]:
        problems.append(f"MLP width {first['hidden']} is not {OFFICIAL_EXPANSION}x the block "
                        f"width {first['width']} (the official model's expansion)")
    stored = dict(config or {})
    if stored.get("head_dim", OFFICIAL_HEAD_DIM) != OFFICIAL_HEAD_DIM:
        # Shapes cannot show it, and the official model would split the heads differently.
        problems.append(f"head_dim={stored['head_dim']} (the official model uses "
                        f"{OFFICIAL_HEAD_DIM}-wide attention heads)")
    defaults = {f.name: f.default for f in dataclasses.fields(TarFlowConfig)}
    for key in sorted(set(stored) - set(_SHAPE_FIELDS)):
        if key not in defaults:
            problems.append(f"config field {key}={stored[key]!r} is unknown to this version "
                            f"of tarflow, so it cannot vouch for the official form")
        elif stored[key] != defaults[key]:
            problems.append(f"{key}={stored[key]!r} (the official model has only "
                            f"{key}={defaults[key]!r})")
    return problems


def select_weights(obj: dict, weights: str | None) -> tuple[dict[str, torch.Tensor], str | None]:
    """The network's state dict of a checkpoint, EMA or raw, and which it is.

    Our Lightning checkpoints keep the EMA weights under ``state_dict`` and the raw ones under
    ``current_model_state`` when trained with EMA (``checkpoint["tarflow"]["weights"]`` says
    which); other files hold one set of weights with no such record.

    Args:
        obj: the loaded checkpoint.
        weights: "ema", "raw", or None for the EMA weights where there are any, else the raw.

    Returns:
        (state dict without prefix, "ema" / "raw" / None when the file does not say).

    Raises:
        CheckpointError: the requested weights are not in the file.
    """
    if weights not in (None, "ema", "raw"):
        raise ValueError(f"weights={weights!r}; expected 'ema', 'raw' or None")
    meta = obj.get("tarflow") if isinstance(obj.get("tarflow"), dict) else {}
    has_ema = meta.get("weights") == "ema" or "current_model_state" in obj
    if not meta and "current_model_state" not in obj:
        if weights is not None:
            raise CheckpointError(f"the file records no EMA/raw distinction (an official .pth, "
                                  f"a .pt or a foreign checkpoint), so weights={weights!r} cannot "
                                  f"be chosen; leave the choice out to export its one set")
        return split_checkpoint(obj)[0], None
    if weights == "ema" and not has_ema:
        raise CheckpointError("the checkpoint has no EMA weights (trained without the EMA "
                              "callback); export its raw weights instead")
    if has_ema and weights == "raw":
        raw = {"state_dict": obj["current_model_state"]}
        return split_checkpoint(raw)[0], "raw"
    return split_checkpoint(obj)[0], "ema" if has_ema else "raw"


def official_config(sd: dict[str, torch.Tensor], config: dict[str, Any] | None) -> TarFlowConfig:
    """The official architecture of an exportable state dict (see :func:`official_problems`).

    Depth, width, block and class counts come from the tensors; patch size, image channels
    and the training noise from the stored config where there is one (shapes alone cannot
    separate C from P).

    Raises:
        CheckpointError: the tensors do not form the official layout (missing or extra keys).
    """
    stored = dict(config or {})
    known = {k: stored[k] for k in ("patch_size", "in_channels", "noise_std") if k in stored}
    official = infer_config(sd, **known)
    problems = weights_mismatch(official, sd)
    if problems:
        raise CheckpointError(f"the weights do not form the official layout of "
                              f"{official.tag}: " + " | ".join(problems))
    return official


def read_for_export(path: str | Path, weights: str | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict | None, str | None, dict]:
    """Load a checkpoint and pick its weights: (state dict, stored config, which, the file).

    The tensors are detached copies, contiguous and on the CPU, so saving them writes only
    their own storage.
    """
    obj = read_file(path, "cpu")
    sd, which = select_weights(obj, weights)
    _, config = split_checkpoint(obj)
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    return sd, config, which, obj
