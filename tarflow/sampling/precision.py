"""Low-precision copies of the network for Jacobi iterations (``sample(..., net_dtype=...)``).

A Jacobi iteration is a full, compute-bound pass of a block, so running the transformer in
bfloat16 roughly halves its cost wherever bf16 matrix units exist (GPUs; x86 CPUs with
AVX512-BF16 or AMX). Only the network runs in low precision: the iterates, the affine update and
the stopping test stay in the noise dtype, so the fixed point moves by the network's rounding
only, and blocks run sequentially keep full precision (a single-token step is overhead-bound and
gains nothing from bf16).
"""

from __future__ import annotations

import copy
import weakref

import torch

from tarflow.model import TarFlow

# model -> {dtype: (parameter stamp, copy)}. Weak keys: the cache dies with the model.
_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stamp(model: TarFlow) -> tuple:
    """Changes whenever a parameter is replaced or updated in place (optimizer, EMA, load)."""
    return tuple((p.data_ptr(), p._version, p.device) for p in model.parameters())


def network_copy(model: TarFlow, dtype: torch.dtype) -> TarFlow:
    """``model`` with parameters and buffers in ``dtype``, in eval mode.

    Cached per model and rebuilt only when the model's parameters change, so a sampling loop or
    a validation callback pays the conversion once per set of weights.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"net_dtype must be a floating dtype, got {dtype}")
    stamp = _stamp(model)
    twins = _TWINS.setdefault(model, {})
    hit = twins.get(dtype)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    twin = copy.deepcopy(model).to(dtype).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    twins[dtype] = (stamp, twin)
    return twin


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """"bfloat16"/"bf16"/"float16"/"fp16"/"float32" (or a dtype, or None) -> torch dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
               "float": "float32", "fp64": "float64", "double": "float64"}
    key = aliases.get(str(name).lower(), str(name).lower())
    if key in ("none", "null", ""):
        return None
    dtype = getattr(torch, key, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unknown net_dtype {name!r}: use bfloat16, float16, float32 or none")
    return dtype


def dtype_name(dtype: torch.dtype | str | None) -> str | None:
    """Canonical name ("bfloat16", ...) of a dtype or alias, as schedules store it."""
    dtype = parse_dtype(dtype)
    return None if dtype is None else str(dtype).removeprefix("torch.")
