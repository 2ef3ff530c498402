"""What names a latent model's autoencoder, and where to find it: specs, records, locating.

A *spec* is the ``model.autoencoder`` config; :func:`resolve_autoencoder` turns it into an
:class:`AutoencoderRecord` (scale and shift from the autoencoder's own config unless given, its
latent geometry, a fingerprint of its weights) without building the network, so start-up checks,
checkpoints and latent manifests can name an autoencoder cheaply. :func:`locate` finds the
recorded autoencoder on this machine (or at another given path with the same fingerprint). The
network itself: :mod:`tarflow.model.autoencoder`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ENCODE_MODES = ("mean", "sample")  # the posterior's mean, or a draw from it
DTYPES = ("float32", "bfloat16", "float16", "float64")
SPEC_KEYS = ("path", "subfolder", "scaling_factor", "shift_factor", "encode", "chunk_size",
             "dtype")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DOCUMENTED = "stabilityai/sd-vae-ft-ema"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class AutoencoderError(ValueError):
    """An autoencoder that cannot be used; the message names it and says how to get one."""


def how_to_get(path: str) -> str:
    """The advice every 'autoencoder not found' message ends with."""
    return (f"train the demo's with `tarflow-train-ae` (writes outputs/autoencoders/demo), or "
            f"download Stable Diffusion's with `hf download {DOCUMENTED} --local-dir <dir>` "
            f"and set model.autoencoder.path=<dir> (a hub id such as {DOCUMENTED} also works "
            f"where the machine can reach the hub)")


@dataclass(frozen=True)
class AutoencoderRecord:
    """Everything that decides what a latent means, as stored in checkpoints and manifests.

    Attributes:
        path: local directory or hub id the weights were loaded from.
        subfolder: sub-directory of ``path`` holding the autoencoder (a pipeline's ``vae``).
        fingerprint: hash of the weight tensors (:func:`weights_fingerprint`).
        scaling_factor: latents are multiplied by this after encoding.
        shift_factor: and shifted by this before (0 = none).
        encode: "mean" (deterministic) or "sample" (a draw from the posterior).
        latent_channels: channels of a latent.
        image_channels: channels of an image.
        downsample: image side / latent side.
        chunk_size: images per encoder / decoder call.
        dtype: the autoencoder's compute dtype.
    """

    path: str
    fingerprint: str
    scaling_factor: float
    shift_factor: float
    latent_channels: int
    image_channels: int
    downsample: int
    subfolder: str | None = None
    encode: str = "mean"
    chunk_size: int = 64
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AutoencoderRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def identity(self) -> dict[str, Any]:
        """The fields two latents must share to be the same kind of data."""
        return {"fingerprint": self.fingerprint, "scaling_factor": float(self.scaling_factor),
                "shift_factor": float(self.shift_factor), "encode": self.encode,
                "latent_channels": self.latent_channels, "downsample": self.downsample}


# ----------------------------------------------------------------------------- finding it
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def looks_like_hub_id(path: str) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(_HUB_ID.match(path)) and not Path(path).expanduser().exists()


def _hub_directory(repo_id: str, subfolder: str | None, key: str) -> Path:
    """The cached snapshot directory of a hub model, downloading it first when allowed."""
    from huggingface_hub import try_to_load_from_cache

    name = f"{subfolder}/config.json" if subfolder else "config.json"
    found = try_to_load_from_cache(repo_id, name)
    if not isinstance(found, str) and not _offline():
        from diffusers import AutoencoderKL

        try:  # a real user's first run: the hub's own download, into its cache
            AutoencoderKL.from_pretrained(repo_id, subfolder=subfolder)
        except Exception as err:
            raise AutoencoderError(
                f"{key}={repo_id} is not a local directory, and the Hugging Face hub could not "
                f"provide it ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                f"{how_to_get(repo_id)}") from None
        found = try_to_load_from_cache(repo_id, name)
    if not isinstance(found, str):
        raise AutoencoderError(
            f"{key}={repo_id} is neither a local directory nor a Hugging Face model in the "
            f"local cache (HF_HUB_OFFLINE is set, so nothing is downloaded); {how_to_get(repo_id)}")
    return Path(found).parent


def resolve_directory(path: str, subfolder: str | None = None, *,
                      key: str = "model.autoencoder.path") -> Path:
    """The local directory holding the autoencoder's ``config.json`` and weights.

    Raises:
        AutoencoderError: a missing path, a directory that is not a diffusers AutoencoderKL.
    """
    if not path:
        raise AutoencoderError(f"{key} is empty; {how_to_get('')}")
    if looks_like_hub_id(str(path)):
        directory = _hub_directory(str(path), subfolder, key)
    else:
        directory = Path(str(path)).expanduser()
        if subfolder:
            directory = directory / subfolder
        if not directory.exists():
            raise AutoencoderError(f"{key}: autoencoder directory {directory} does not exist; "
                                   f"{how_to_get(str(path))}")
    if not (directory / "config.json").is_file() or not weight_files(directory):
        raise AutoencoderError(
            f"{key}: {directory} is not a diffusers AutoencoderKL directory (it needs "
            f"config.json and {WEIGHT_FILES[0]}, as save_pretrained writes them); "
            f"{how_to_get(str(path))}")
    return directory


def weight_files(directory: Path) -> list[Path]:
    """The weight files ``from_pretrained`` reads (safetensors first, shards included)."""
    for name in WEIGHT_FILES:
        index = directory / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [directory / s for s in shards]
        if (directory / name).is_file():
            return [directory / name]
    return []


def read_config(directory: Path, key: str = "model.autoencoder.path") -> dict[str, Any]:
    config = json.loads((directory / "config.json").read_text())
    kind = config.get("_class_name")
    if kind != "AutoencoderKL":
        raise AutoencoderError(f"{key}: {directory} holds a {kind}, not an AutoencoderKL (for a "
                               f"full pipeline give model.autoencoder.subfolder=vae)")
    return config


@functools.lru_cache(maxsize=16)
def _fingerprint(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _, _ in files:
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(name, framework="pt") as handle:
                tensors = {k: handle.get_tensor(k) for k in sorted(handle.keys())}
        else:
            tensors = torch.load(name, map_location="cpu", weights_only=True, mmap=True)
        for k in sorted(tensors):
            t = tensors[k].contiguous()
            h.update(f"{k}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())  # the stored bytes
    return h.hexdigest()[:16]


def weights_fingerprint(directory: Path) -> str:
    """A hash of the weight tensors (names, shapes, dtypes, values), not of the files' bytes, so
    a copy or a re-save of the same weights has the same fingerprint. Cached per process by
    file size and modification time (a large autoencoder takes about a second to hash)."""
    files = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in weight_files(directory))
    return _fingerprint(files)


def resolve_autoencoder(spec: Mapping[str, Any] | AutoencoderRecord, *,
                        key: str = "model.autoencoder") -> AutoencoderRecord:
    """The record of a ``model.autoencoder`` spec (a complete record is returned as it is).

    Reads the autoencoder's ``config.json`` (scale, shift, geometry) and hashes its weights; the
    network itself is not built. Unknown keys and bad values fail here, naming the key.
    """
    if isinstance(spec, AutoencoderRecord):
        return spec
    values = dict(spec)
    if "fingerprint" in values:  # already resolved (a checkpoint's or a manifest's record)
        return AutoencoderRecord.from_dict(values)
    unknown = sorted(set(values) - set(SPEC_KEYS))
    if unknown:
        raise AutoencoderError(f"unknown {key} option(s) {unknown}; known: {list(SPEC_KEYS)}")
    mode = values.get("encode") or "mean"
    if mode not in ENCODE_MODES:
        raise AutoencoderError(f"{key}.encode={mode!r} must be one of {ENCODE_MODES}")
    dtype = values.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise AutoencoderError(f"{key}.dtype={dtype!r} must be one of {DTYPES}")
    chunk = int(values.get("chunk_size") or 64)
    if chunk < 1:
        raise AutoencoderError(f"{key}.chunk_size={chunk} must be >= 1")
    path, subfolder = str(values.get("path") or ""), values.get("subfolder") or None
    directory = resolve_directory(path, subfolder, key=f"{key}.path")
    config = read_config(directory, f"{key}.path")
    scale = values.get("scaling_factor")
    scale = float(config.get("scaling_factor") or 1.0) if scale is None else float(scale)
    shift = values.get("shift_factor")
    shift = float(config.get("shift_factor") or 0.0) if shift is None else float(shift)
    if not math.isfinite(scale) or scale <= 0 or not math.isfinite(shift):
        raise AutoencoderError(f"{key}: scaling_factor={scale} must be > 0 and shift_factor="
                               f"{shift} finite")
    widths = config.get("block_out_channels") or [64]
    local = not looks_like_hub_id(path)
    return AutoencoderRecord(
        path=str(Path(path).expanduser().resolve()) if local else path,
        fingerprint=weights_fingerprint(directory), scaling_factor=scale, shift_factor=shift,
        latent_channels=int(config.get("latent_channels", 4)),
        image_channels=int(config.get("in_channels", 3)), downsample=2 ** (len(widths) - 1),
        subfolder=subfolder, encode=mode, chunk_size=chunk, dtype=dtype)


def locate(record: AutoencoderRecord, path: str | None = None, *,
           key: str = "autoencoder_path") -> Path:
    """The directory of a recorded autoencoder on this machine: its recorded path, or ``path``
    (a copy elsewhere). Its weights must have the recorded fingerprint.

    Raises:
        AutoencoderError: not found (saying how to point at a copy), or other weights.
    """
    try:
        directory = resolve_directory(path or record.path, record.subfolder,
                                      key=key if path else "the recorded autoencoder path")
    except AutoencoderError as err:
        if path:
            raise
        raise AutoencoderError(
            f"this latent model's autoencoder {record.path} (weights fingerprint "
            f"{record.fingerprint}) is not on this machine: pass {key}=<directory of a copy> "
            f"({err})") from None
    found = weights_fingerprint(directory)
    if found != record.fingerprint:
        raise AutoencoderError(
            f"the autoencoder at {path or record.path} has weights fingerprint {found}, but "
            f"the latents were made with {record.fingerprint} ({record.path}); other weights "
            f"would decode them into wrong images: point {key} at a copy of that autoencoder")
    return directory
