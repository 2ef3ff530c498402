"""Writing a prepared directory (layout: :mod:`tarflow.data.prepared`) once, resumably.

Every source is checked and fingerprinted before anything is written. The draft (what will be
written, from which sources) goes to ``plan.json`` first; each source part (one npz file, or
``chunk`` images of a folder) is copied into ``<split>/images.npy.partial``, flushed and fsynced,
and only then recorded in ``progress.json``. A restarted preparation with the same draft skips the
recorded parts; a part interrupted mid-way is simply copied again. A split's files lose their
``.partial`` suffix once whole, and ``manifest.json``, the only file a reader accepts, is written
last. Sources are checked and fingerprinted in :mod:`tarflow.data.prepare_sources`.

A split prepared later (``--splits val`` after ``--splits train``) joins a finished set when
the set's dataset, size, channels, classes and shared splits' sources agree: the held splits are
kept, the new one is copied the same resumable way, and the manifest is replaced last. A set
the output's disk cannot hold is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tarflow.data.errors import DataError
from tarflow.data.imagenet_npz import NUM_CLASSES
from tarflow.data.prepare_sources import check_sources
from tarflow.data.prepared import (
    DRAFT,
    FORMAT,
    MANIFEST,
    PROGRESS,
    array_files,
    describe,
    read_prepared,
)
from tarflow.data.registry import PREPARABLE
from tarflow.files import atomic_write, fsync_dir, fsync_file

__all__ = ["prepare_dataset"]

LOCK = ".prepare.lock"


def _durable_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True))


def _sources_id(name: str, img_size: int, channels: int, prints: Mapping[str, Any]) -> str:
    """The set's identity: dataset, size, channels and every split's source fingerprint."""
    blob = json.dumps(
        {"name": name, "img_size": img_size, "channels": channels, "src": dict(prints)},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _draft(name, root: Path, img_size, channels, sources: dict[str, Any]) -> dict[str, Any]:
    prints = {split: src.fingerprint for split, src in sources.items()}
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
        "sources_id": _sources_id(name, img_size, channels, prints),
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


def _same_set(theirs: Mapping[str, Any], draft: Mapping[str, Any]) -> bool:
    """Whether ``draft``'s splits belong to the set ``theirs`` describes: the same dataset, size,
    channels and classes, and the same source for every split both hold (with no split in
    common, the same source directory)."""
    if any(theirs.get(k) != draft[k] for k in ("name", "img_size", "channels", "class_names")):
        return False
    common = set(theirs["splits"]) & set(draft["splits"])
    if not common:
        theirs_root = Path(str(theirs.get("source_root"))).resolve()
        return theirs_root == Path(draft["source_root"]).resolve()
    return all(theirs["splits"][s]["source"] == draft["splits"][s]["source"] for s in common)


def _refuse_other(out: Path, what: str, theirs: Mapping[str, Any], draft: Mapping[str, Any]):
    raise DataError(
        f"{out} {what} {describe(theirs)}, not {describe(draft)}; choose another output "
        "directory or delete it"
    )


def _all_parts(manifest: Mapping[str, Any]) -> dict[str, list[int]]:
    return {s: list(range(len(info["parts"]))) for s, info in manifest["splits"].items()}


def _existing_state(out: Path, draft: dict[str, Any]) -> tuple[str, dict[str, Any], dict]:
    """What to do in ``out``: ``"done"``, ``"resume"``, ``"extend"`` (add splits to a finished
    set) or ``"fresh"``, with the draft to carry out and the progress record (parts already
    copied); refuse another set's directory in one line."""
    manifest = read_prepared(out) if (out / MANIFEST).is_file() else None
    unfinished = json.loads((out / DRAFT).read_text()) if (out / DRAFT).is_file() else None
    if unfinished is not None and manifest is not None:
        if unfinished.get("sources_id") == manifest.get("sources_id"):
            unfinished = None  # a crash after the manifest, before the clean-up
    held = set(manifest["splits"]) if manifest is not None else set()
    if unfinished is not None:  # a preparation, or an added split, to finish
        if not _same_set(unfinished, draft):
            _refuse_other(out, "holds an unfinished preparation of", unfinished, draft)
        needed = sorted(set(unfinished["splits"]) - held)
        if not set(needed) <= set(draft["splits"]) <= set(unfinished["splits"]):
            raise DataError(
                f"{out} holds an unfinished preparation of the splits {needed}; finish it "
                f"first: the same command with --splits {' '.join(needed)}"
            )
        state = {"done": _all_parts(manifest) if manifest else {}, "substituted": {}}
        if (out / PROGRESS).is_file():
            state = json.loads((out / PROGRESS).read_text())
        return "resume", unfinished, state
    if manifest is not None:
        if not _same_set(manifest, draft):
            _refuse_other(out, "holds", manifest, draft)
        new = [s for s in draft["splits"] if s not in held]
        if not new:
            return "done", manifest, {"done": _all_parts(manifest), "substituted": {}}
        # A split added to a finished set: the held splits stay as they are (readers keep
        # reading them through the old manifest until the new one replaces it).
        merged = {k: v for k, v in manifest.items() if k != "complete"}
        merged["splits"] = {**manifest["splits"], **{s: draft["splits"][s] for s in new}}
        prints = {s: info["source"] for s, info in merged["splits"].items()}
        merged["sources_id"] = _sources_id(
            merged["name"], merged["img_size"], merged["channels"], prints
        )
        return "extend", merged, {"done": _all_parts(manifest), "substituted": {}}
    if out.exists() and (not out.is_dir() or any(p.name != LOCK for p in out.iterdir())):
        raise DataError(f"output {out} exists and is not a prepared set; choose a new directory")
    return "fresh", draft, {"done": {}, "substituted": {}}


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _check_space(out: Path, draft: Mapping[str, Any], progress_state: Mapping[str, Any]) -> None:
    """Refuse a set the disk under ``out`` cannot hold, before a byte of it is written."""
    item = draft["channels"] * draft["img_size"] ** 2 + 8  # uint8 image + int64 label
    done = progress_state["done"]
    need = item * sum(
        n
        for split, info in draft["splits"].items()
        for k, n in enumerate(info["parts"])
        if k not in done.get(split, ())
    )
    where = out
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise DataError(
            f"{out} would need {_size(need)} for {describe(draft)} but its disk has "
            f"{_size(free)} free; choose a smaller --img-size or another output directory"
        )


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


def _prepare_split(out, split, src, draft, progress_state, progress, workers) -> None:
    """Copy the parts of one split not yet recorded, then give its files their final names."""
    info, c, s = draft["splits"][split], draft["channels"], draft["img_size"]
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


def _run(out, draft, sources, progress, on_draft, workers) -> tuple[dict[str, Any], bool]:
    """The copying of :func:`prepare_dataset`, holding the directory's lock."""
    # Again: another preparation may have finished or started here before the lock was ours.
    # On resume, the recorded draft: a changed --chunk must not move the part boundaries.
    state, draft, progress_state = _existing_state(out, draft)
    if on_draft is not None:
        copied = sum(
            draft["splits"][split]["parts"][k]
            for split, ks in progress_state["done"].items()
            for k in ks
        )
        on_draft(draft, state, copied)
    if state == "done":
        for leftover in (DRAFT, PROGRESS):  # a crash after the manifest, before the clean-up
            (out / leftover).unlink(missing_ok=True)
        return read_prepared(out), False
    if state in ("fresh", "extend"):
        _durable_json(out / DRAFT, draft)
    for split, src in sources.items():
        src.parts = draft["splits"][split]["parts"]
        _prepare_split(out, split, src, draft, progress_state, progress, workers)
    for split, subs in progress_state["substituted"].items():
        draft["splits"][split]["substituted"] = subs
    _durable_json(out / MANIFEST, {**draft, "complete": True})
    for name_ in (DRAFT, PROGRESS):
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
    on_draft: Callable[[dict[str, Any], str, int], None] | None = None,
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
        on_draft: called ``(draft, state, copied)`` once the sources are checked, before any
            copying; state is ``"fresh"``, ``"resume"`` or ``"done"``, copied the number of
            images an interrupted run already copied.

    Returns:
        The manifest, and whether anything was copied (False: it was already prepared).
    """
    root, out = Path(source).expanduser(), Path(out).expanduser()
    img_size = int(PREPARABLE.get(name, 0) if img_size is None else img_size)
    if img_size < 1:
        raise DataError(f"--img-size must be at least 1 (got {img_size})")
    if chunk < 1 or workers < 0 or channels not in (1, 3):
        raise DataError(
            f"need chunk >= 1, workers >= 0, channels 1 or 3; got {chunk}, {workers}, {channels}"
        )
    sources = check_sources(name, root, img_size, channels, splits, chunk)
    draft = _draft(name, root, img_size, channels, sources)
    # Refuse another set's directory, or a set the disk cannot hold, before creating anything.
    state, draft_, progress_state = _existing_state(out, draft)
    if state != "done":
        _check_space(out, draft_, progress_state)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        result = _run(out, draft, sources, progress, on_draft, workers)
        # A finished set keeps no lock file (a later run finds the manifest and writes nothing).
        (out / LOCK).unlink(missing_ok=True)
        return result
