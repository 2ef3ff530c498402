"""Writing a prepared directory (layout: :mod:`tarflow.data.prepared`) once, resumably.

Every source is checked and fingerprinted before anything is written. The plan (what will be
written, from which sources) goes to ``plan.json`` first; each source part (one npz file, or
``chunk`` images of a folder) is copied into ``<split>/images.npy.partial``, flushed and fsynced,
and only then recorded in ``progress.json``. A restarted preparation with the same plan skips the
recorded parts; a part interrupted mid-way is simply copied again. A split's files lose their
``.partial`` suffix once whole, and ``manifest.json``, the only file a reader accepts, is written
last. Fingerprints (name, size and a hash of the first and last MiB of each npz file; the sorted
listing with sizes of an image folder) are cheap to recompute and survive a copy of the sources,
unlike modification times.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tarflow.data.errors import DataError
from tarflow.data.folder import ImageFolderDataset
from tarflow.data.imagenet_npz import NUM_CLASSES, check_header, npz_files, read_npz
from tarflow.data.prepared import (
    FORMAT,
    MANIFEST,
    PLAN,
    PROGRESS,
    array_files,
    describe,
    looks_prepared,
    read_prepared,
)
from tarflow.data.registry import PREPARABLE, build_dataset
from tarflow.files import atomic_write, fsync_dir, fsync_file

__all__ = ["prepare_dataset"]

_SAMPLE = 1 << 20  # bytes hashed at each end of an npz file
LOCK = ".prepare.lock"


def _durable_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True))


def _file_print(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_SAMPLE))
        f.seek(max(0, size - _SAMPLE))
        h.update(f.read(_SAMPLE))
    return {"name": path.name, "size": size, "sample_sha256": h.hexdigest()}


class _NpzSource:
    """Official npz files of one split; part k is file k."""

    def __init__(self, files: list[Path], img_size: int) -> None:
        self.root, self.files, self.img_size = files[0].parent, files, img_size
        self.parts = [check_header(f, img_size) for f in files]
        self.fingerprint = {"kind": "npz", "files": [_file_print(f) for f in files]}

    def read(self, k: int, start: int, workers: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        images, labels = read_npz(self.files[k], self.parts[k], self.img_size)
        return images, labels, []


class _Cropped(Dataset):
    """Folder images ``start ..`` as uint8 (C, S, S) tensors, for DataLoader workers."""

    def __init__(self, folder: ImageFolderDataset, start: int, count: int) -> None:
        self.folder, self.start, self.count = folder, start, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        img, label, read = self.folder.image(self.start + i)
        a = np.array(img)  # (S, S) for "L", (S, S, C) for "RGB"; a writable copy
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # -> (C, S, S)
        return torch.from_numpy(np.ascontiguousarray(a)), label, read


class _FolderSource:
    """An image folder split; part k is images ``[k * chunk, (k + 1) * chunk)``."""

    def __init__(self, folder: ImageFolderDataset, chunk: int) -> None:
        self.folder, self.root = folder, folder.root
        n = len(folder)
        self.parts = [min(chunk, n - s) for s in range(0, n, chunk)]
        listing = hashlib.sha256()
        total = 0
        for i in range(n):
            path = folder.path(i)
            size = path.stat().st_size
            total += size
            listing.update(f"{path.relative_to(folder.root)}\0{size}\n".encode("utf-8", "replace"))
        self.fingerprint = {
            "kind": "folder",
            "classes": folder.class_names,
            "files": n,
            "bytes": total,
            "listing_sha256": listing.hexdigest(),
        }

    def read(self, k: int, start: int, workers: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        loader = DataLoader(
            _Cropped(self.folder, start, self.parts[k]), batch_size=64, num_workers=workers
        )
        images, labels, substituted = [], [], []
        at = start
        for x, y, read in loader:
            images.append(x.numpy())
            labels.append(y.numpy())
            wanted = torch.arange(at, at + len(x))
            # An unreadable image was replaced by the next readable one, as the reader does.
            substituted += [str(self.folder.path(int(i))) for i in wanted[read != wanted]]
            at += len(x)
        return np.concatenate(images), np.concatenate(labels).astype(np.int64), substituted


def _sources(name, root: Path, img_size, channels, splits, chunk) -> dict[str, Any]:
    """Check the sources of every split (nothing is written yet)."""
    if name not in PREPARABLE:
        raise DataError(f"tarflow-prepare reads {sorted(PREPARABLE)}, not {name!r}")
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise FileNotFoundError(f"source directory {root} {what}")
    if looks_prepared(root):
        raise DataError(f"{root} is already a prepared set; pass the original files' directory")
    npz = name == "imagenet64" and any(root.glob("*.npz"))
    if splits is None:
        if npz:
            splits = [
                s
                for s, glob in (("train", "train_data_batch_*.npz"), ("val", "val_data.npz"))
                if any(root.glob(glob))
            ] or ["train"]
        else:
            splits = [s for s in ("train", "val") if (root / s).is_dir()] or ["train"]
    out = {}
    for split in splits:
        if split not in ("train", "val"):
            raise DataError(f"splits are 'train' and 'val', not {split!r}")
        if npz:
            if channels != 3:
                raise DataError(f"ImageNet npz files are RGB; use --channels 3 (got {channels})")
            out[split] = _NpzSource(npz_files(root, train=split == "train"), img_size)
        else:
            folder = build_dataset(
                name, root=root, img_size=img_size, split=split, channels=channels, flip=False
            )
            out[split] = _FolderSource(folder, chunk)
    return out


def _plan(name, root: Path, img_size, channels, sources: dict[str, Any]) -> dict[str, Any]:
    prints = {split: src.fingerprint for split, src in sources.items()}
    blob = json.dumps(
        {"name": name, "img_size": img_size, "channels": channels, "src": prints}, sort_keys=True
    )
    first = next(iter(sources.values()))
    classes = getattr(getattr(first, "folder", None), "class_names", None)
    return {
        "format": FORMAT,
        "name": name,
        "img_size": img_size,
        "channels": channels,
        "num_classes": NUM_CLASSES if classes is None else len(classes),
        "class_names": classes or [],
        "layout": "images uint8 (N, C, S, S); labels int64 (N,), 0-based",
        "source_root": str(root),
        "sources_id": hashlib.sha256(blob.encode()).hexdigest()[:12],
        "splits": {
            split: {
                "count": sum(src.parts),
                "parts": src.parts,
                "source": src.fingerprint,
                **array_files(split),
            }
            for split, src in sources.items()
        },
    }


def _existing_state(out: Path, plan: dict[str, Any]) -> str:
    """``"done"``, ``"resume"`` or ``"fresh"``; refuse another set's directory in one line."""
    for name, state in ((MANIFEST, "done"), (PLAN, "resume")):
        if (out / name).is_file():
            theirs = read_prepared(out) if state == "done" else json.loads((out / name).read_text())
            if theirs.get("sources_id") != plan["sources_id"]:
                what = "holds" if state == "done" else "holds an unfinished preparation of"
                raise DataError(
                    f"{out} {what} {describe(theirs)}, not {describe(plan)}; choose another "
                    "output directory or delete it"
                )
            return state
    if out.exists() and (not out.is_dir() or any(p.name != LOCK for p in out.iterdir())):
        raise DataError(f"output {out} exists and is not a prepared set; choose a new directory")
    return "fresh"


def _open_partial(path: Path, shape: tuple[int, ...], dtype: str) -> np.memmap:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    arr = np.lib.format.open_memmap(path, mode="r+")
    if arr.shape != shape or arr.dtype != np.dtype(dtype):
        raise DataError(
            f"{path} is {arr.dtype} {arr.shape}, not {dtype} {shape}; delete the "
            "output directory and prepare again"
        )
    return arr


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock file, or refuse at once: two preparations must not share parts."""
    with open(out / LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"another tarflow-prepare is writing {out}; wait for it") from None
        yield


def _prepare_split(out, split, src, plan, progress_state, progress, workers) -> None:
    """Copy the parts of one split not yet recorded, then give its files their final names."""
    info, c, s = plan["splits"][split], plan["channels"], plan["img_size"]
    done = progress_state["done"].setdefault(split, [])
    paths = {k: out / rel for k, rel in array_files(split).items()}
    partial = {k: p.with_name(p.name + ".partial") for k, p in paths.items()}
    if len(done) < len(info["parts"]):
        if done and not partial["images"].exists():
            raise DataError(
                f"{out / PROGRESS} records copied parts of {split} but {partial['images']} is "
                "gone; delete the output directory and prepare again"
            )
        images = _open_partial(partial["images"], (info["count"], c, s, s), "uint8")
        labels = _open_partial(partial["labels"], (info["count"],), "int64")
        starts = np.concatenate([[0], np.cumsum(info["parts"])]).tolist()
        for k, n in enumerate(info["parts"]):
            if k in done:
                continue
            x, y, substituted = src.read(k, starts[k], workers)
            images[starts[k] : starts[k] + n], labels[starts[k] : starts[k] + n] = x, y
            images.flush(), labels.flush()
            fsync_file(partial["images"]), fsync_file(partial["labels"])
            done.append(k)
            progress_state["substituted"].setdefault(split, []).extend(substituted)
            _durable_json(out / PROGRESS, progress_state)
            if progress is not None:
                progress(split, n)
        del images, labels  # unmap before renaming
    for key in ("images", "labels"):
        if partial[key].exists():
            os.replace(partial[key], paths[key])
    fsync_dir(paths["images"].parent)


def _run(out, plan, sources, progress, on_plan, workers) -> tuple[dict[str, Any], bool]:
    """The copying of :func:`prepare_dataset`, holding the directory's lock."""
    # Again: another preparation may have finished or started here before the lock was ours.
    state = _existing_state(out, plan)
    progress_state = {"done": {}, "substituted": {}}
    if state == "resume":  # with the recorded parts: a changed --chunk must not move boundaries
        plan = json.loads((out / PLAN).read_text())
        if (out / PROGRESS).is_file():
            progress_state = json.loads((out / PROGRESS).read_text())
    if on_plan is not None:
        copied = sum(
            plan["splits"][split]["parts"][k]
            for split, ks in progress_state["done"].items()
            for k in ks
        )
        on_plan(plan, state, copied)
    if state == "done":
        for leftover in (PLAN, PROGRESS):  # a crash after the manifest, before the clean-up
            (out / leftover).unlink(missing_ok=True)
        return read_prepared(out), False
    if state == "fresh":
        _durable_json(out / PLAN, plan)
    for split, src in sources.items():
        src.parts = plan["splits"][split]["parts"]
        _prepare_split(out, split, src, plan, progress_state, progress, workers)
    for split, subs in progress_state["substituted"].items():
        plan["splits"][split]["substituted"] = subs
    _durable_json(out / MANIFEST, {**plan, "complete": True})
    for name_ in (PLAN, PROGRESS):
        (out / name_).unlink(missing_ok=True)
    return read_prepared(out), True


def prepare_dataset(
    name: str,
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    img_size: int | None = None,
    channels: int = 3,
    splits: list[str] | None = None,
    chunk: int = 10_000,
    workers: int = 0,
    progress: Callable[[str, int], None] | None = None,
    on_plan: Callable[[dict[str, Any], str, int], None] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Prepare ``source`` into ``out`` (or finish an interrupted preparation there).

    Args:
        name: registry name (``imagenet64``, ``imagenet128``, ``imagenet256``, ``afhq``).
        source: the directory the plain reader would read (npz files or an image folder).
        out: the prepared directory (new, empty, or this same preparation's).
        img_size: training side S (default: the data config's for ``name``).
        channels: 1 or 3 (folders; npz files are RGB).
        splits: ``["train", "val"]`` or a subset; default: those the source has.
        chunk: images per resumable part of a folder (an npz file is one part).
        workers: DataLoader processes decoding folder images.
        progress: called ``(split, images)`` after each part is copied.
        on_plan: called ``(plan, state, copied)`` once the sources are checked, before any
            copying; state is ``"fresh"``, ``"resume"`` or ``"done"``, copied the number of
            images an interrupted run already copied.

    Returns:
        The manifest, and whether anything was copied (False: it was already prepared).
    """
    root, out = Path(source).expanduser(), Path(out).expanduser()
    img_size = int(img_size or PREPARABLE.get(name, 0))
    if img_size < 1 or chunk < 1 or workers < 0 or channels not in (1, 3):
        raise DataError(
            f"need img_size >= 1, chunk >= 1, workers >= 0, channels 1 or 3; got "
            f"{img_size}, {chunk}, {workers}, {channels}"
        )
    sources = _sources(name, root, img_size, channels, splits, chunk)
    plan = _plan(name, root, img_size, channels, sources)
    _existing_state(out, plan)  # refuse another set's directory before creating anything
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        result = _run(out, plan, sources, progress, on_plan, workers)
        # A finished set keeps no lock file (a later run finds the manifest and writes nothing).
        (out / LOCK).unlink(missing_ok=True)
        return result
