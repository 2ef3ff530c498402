"""Sharded training checkpoints (``trainer=fsdp``) read in one process, without a process group.

Lightning's FSDP strategy with ``state_dict_type="sharded"`` writes a checkpoint as a directory:
``meta.pt`` (everything but tensors of the model and optimiser: hyper-parameters, counters, our
``tarflow`` record) plus a ``torch.distributed.checkpoint`` (DCP) store, ``.metadata`` and one
``__<rank>_0.distcp`` file per rank, holding ``model.<key>`` and the optimiser state. Only the
model's entries are read here, through DCP's own loader (``no_dist=True``: no process group,
any number of ranks wrote it), into a dict shaped like a Lightning checkpoint
(``state_dict`` = the module's tensors), so every reader of single-file checkpoints takes it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

METADATA_FILE = "meta.pt"  # Lightning's name for the non-tensor part
_MODEL = "model"  # the DCP prefix Lightning stores the module's state under


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A directory with Lightning's ``meta.pt`` and a DCP ``.metadata`` file."""
    path = Path(path)
    return path.is_dir() and (path / METADATA_FILE).is_file() and (path / ".metadata").is_file()


def read_sharded(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint as one dict: ``meta.pt``'s entries plus ``state_dict`` (full tensors).

    Reads the model's tensors only (the optimiser state stays on disk). Both parts go through
    weights-only loaders: ``torch.load(weights_only=True)`` and DCP's tensor reader.

    Raises:
        ValueError: not a sharded checkpoint, or a store without model entries.
    """
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise ValueError(f"{path} is not a sharded checkpoint directory (meta.pt + .metadata)")
    meta = torch.load(path / METADATA_FILE, map_location="cpu", weights_only=True)
    reader = dcp.FileSystemReader(path)
    prefix = _MODEL + "."
    entries = reader.read_metadata().state_dict_metadata
    # Empty tensors of the stored shapes and dtypes: DCP fills them in place.
    model = {key[len(prefix):]: torch.empty(tuple(md.size), dtype=md.properties.dtype)
             for key, md in entries.items()
             if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
    if not model:
        raise ValueError(f"{path} holds no model tensors under {prefix!r}")
    with warnings.catch_warnings():
        # DCP warns that it assumes a single process: that is the point here.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({_MODEL: model}, storage_reader=reader, no_dist=True)
    state = {k: v.to(map_location) for k, v in model.items()}
    return {**meta, "state_dict": state}
