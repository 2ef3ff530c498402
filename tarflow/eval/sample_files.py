"""Images in files: ADM-layout ``.npz`` (samples and reference batches), PNG folders, and the
per-image features of a reference, cached beside its statistics.

ADM's ``evaluator.py`` reads ``arr_0``: (N, H, W, C) uint8 images (``arr_1``: labels); its
reference batches (``VIRTUAL_imagenet256_labeled.npz``, ...) add ``mu``/``sigma`` of those images'
pool3 features. DiT's ``sample_ddp.py`` and ``tarflow-sample`` write the same layout. The
array's shape and dtype are read from the ``.npy`` header inside the zip, so a 50k-image file is
checked without being loaded, and a rank loads only the rows it scores.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tarflow.files import atomic_write

IMAGE_KEY = "arr_0"
_PNG_SUFFIXES = (".png",)


def npz_array_info(path: str | Path, name: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of array ``name`` in an ``.npz`` from its header (None: not there)."""
    with zipfile.ZipFile(path) as archive:
        member = f"{name}.npy"
        if member not in archive.namelist():
            return None
        with archive.open(member) as handle:
            version = np.lib.format.read_magic(handle)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read(handle)
    return tuple(int(s) for s in shape), np.dtype(dtype)


def png_files(folder: str | Path) -> list[Path]:
    """The PNG images of a folder, in name order (``000123.png`` sorts as the set does)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in _PNG_SUFFIXES)


def image_count_and_shape(path: str | Path) -> tuple[int, tuple[int, int, int]]:
    """(N, (H, W, C)) of an ADM ``.npz`` or a PNG folder, without loading the images."""
    path = Path(path)
    if path.is_dir():
        files = png_files(path)
        if not files:
            raise ValueError(f"samples={path}: the folder holds no .png images")
        from PIL import Image

        with Image.open(files[0]) as image:
            channels = len(image.getbands())
            return len(files), (image.height, image.width, channels)
    info = npz_array_info(path, IMAGE_KEY)
    if info is None:
        raise ValueError(f"{path} holds no {IMAGE_KEY} array (ADM layout: {IMAGE_KEY} images "
                         f"(N, H, W, C) uint8, optional arr_1 labels)")
    shape, dtype = info
    if len(shape) != 4 or shape[-1] not in (1, 3) or dtype != np.uint8:
        raise ValueError(f"{path}: {IMAGE_KEY} is {dtype} {shape}; the ADM layout is "
                         f"(N, H, W, C) uint8 with C 1 or 3")
    return shape[0], (shape[1], shape[2], shape[3])


def load_rows(path: str | Path, rows: Sequence[int]) -> np.ndarray:
    """The images ``rows`` (N', H, W, C) uint8 of an ADM ``.npz`` or a PNG folder."""
    path = Path(path)
    if path.is_dir():
        from PIL import Image

        files = png_files(path)
        images = [np.asarray(Image.open(files[i])) for i in rows]
        return np.stack([x[..., None] if x.ndim == 2 else x for x in images])
    with np.load(path, allow_pickle=False) as data:
        return np.asarray(data[IMAGE_KEY])[np.asarray(rows, dtype=np.int64)]


def to_model_images(images: np.ndarray) -> Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float in [-1, 1]; the extractors quantise these back
    to the same uint8 (``round((x + 1) * 127.5)``)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def image_batches(path: str | Path, rows: Sequence[int], batch_size: int) -> Iterator[
        tuple[list[int], Tensor]]:
    """(rows, images in [-1, 1]) batches of the given rows."""
    rows = list(rows)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        yield chunk, to_model_images(load_rows(path, chunk))


def load_or_compute_features(path: str | Path, compute: Callable[[], Tensor],
                             meta: dict[str, Any]) -> Tensor:
    """(M, F) float32 reference features from the cache ``path`` when its ``meta`` equals
    ``meta``, else computed by ``compute()`` and cached (atomically)."""
    path = Path(path)
    want = json.loads(json.dumps(meta, sort_keys=True))
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                if json.loads(str(data["meta"])) == want:
                    return torch.from_numpy(data["features"].astype(np.float32))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # unreadable or for other images: computed again below
    features = compute().detach().float().cpu()
    arrays = {"features": features.numpy(), "meta": np.array(json.dumps(want, sort_keys=True))}
    atomic_write(path, lambda handle: np.savez(handle, **arrays))
    return features
