"""Checks every command shares: a checkpoint file that exists and is a torch archive, a device
that exists here, a dtype the samplers run in, argparse counts within their range, output paths
that can be written, and ``~`` in path values expanded once, before any record or work."""

from __future__ import annotations

import argparse
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from tarflow.app.checks.paths import check_writable
from tarflow.app.errors import fail
from tarflow.model.loading import DTYPES
from tarflow.model.sharded import is_sharded_checkpoint


def checkpoint_file(key: str, value: Any, hint: str) -> Path:
    """The file (or sharded checkpoint directory) ``key`` names, refused when it is missing or
    not a torch archive."""
    path = Path(str(value)).expanduser()
    if is_sharded_checkpoint(path):  # trainer=fsdp writes checkpoints as directories
        return path
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{key} {path} {what}; {hint}")
    # torch.save writes a zip archive; a truncated one has no central directory at its end.
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{key} {path} is not a readable checkpoint (truncated, or not written by torch.save)"
        )
    return path


def check_device(name: Any) -> None:
    """``auto``, ``cpu`` or an accelerator that exists here (``cuda``, ``cuda:1``, ``mps``)."""
    if name in (None, "auto"):
        return
    usage = "use auto, cpu, cuda or cuda:<i>"
    try:
        device = torch.device(str(name))
    except RuntimeError:
        raise ValueError(f"device={name} is not a device: {usage}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name} but no CUDA GPU is available here; use device=cpu "
                             f"or device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name} but this machine has {torch.cuda.device_count()} "
                             f"GPU(s) (cuda:0...)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device={name} but MPS is not available here; use device=cpu")
    elif device.type != "cpu":
        raise ValueError(f"device={name}: {usage}")


def check_dtype(name: Any) -> None:
    """A dtype the samplers run in (:data:`tarflow.model.loading.DTYPES`)."""
    if str(name) not in DTYPES:
        raise ValueError(f"dtype={name} must be one of {DTYPES}")


def refuse_low_counts(args: argparse.Namespace, minimum: dict[str, int]) -> None:
    """An argparse command's counts below their minimum (the value 0 would fail deep inside a
    sampler or a training loop) end in one line naming the flag, before any work."""
    for key, least in minimum.items():
        values = getattr(args, key, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and value < least:
                fail(f"--{key.replace('_', '-')} {value} must be >= {least}")


def refuse_unwritable(args: argparse.Namespace, *, folders: dict[str, str] | None = None,
                      files: dict[str, str] | None = None) -> None:
    """An argparse command's output paths that cannot be written (:func:`check_writable`; keys:
    the attribute, values: the flag or metavar the message names) end in one line, before any
    work; the ones that can are kept ``~``-expanded."""
    for names, folder in ((folders or {}, True), (files or {}, False)):
        for name, flag in names.items():
            value = getattr(args, name, None)
            if value in (None, ""):
                continue
            try:
                check_writable(flag, value, folder=folder)
            except ValueError as err:
                fail(str(err))
            setattr(args, name, os.path.expanduser(str(value)))  # keeps a trailing "/"


def refuse_fid_inputs(count: int, stats: str | None, weights: str | None,
                      image_side: int) -> None:
    """``--fid N`` of an argparse command: its ``--fid-stats`` must be readable statistics of
    this resolution and the Inception weights must be here, checked before the timing work
    (which a late refusal would lose, ``--json`` included)."""
    from tarflow.eval import load_reference
    from tarflow.eval.inception import find_inception_weights

    if not count:
        return
    if not stats:
        fail(f"--fid {count} needs --fid-stats (reference statistics of the data: our .npz "
             f"cache, e.g. from tarflow-eval or scripts/prepare_fid_stats.py)")
    try:
        load_reference(Path(stats).expanduser(), expect={"img_size": int(image_side)})
        find_inception_weights(weights)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
