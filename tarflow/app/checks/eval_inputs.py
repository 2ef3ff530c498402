"""Start-up checks of what ``tarflow-eval`` scores and against what: a samples file
(``samples=PATH``), an ADM reference batch, and the number of ranks.

Each refusal is one ``ValueError`` naming the key, raised before any record or work (a samples
``.npz`` is checked from its array header, not loaded).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from tarflow.app.distributed import World
from tarflow.eval.sample_files import IMAGE_KEY, image_count_and_shape, npz_array_info


def check_samples(cfg: DictConfig) -> tuple[int, tuple[int, int, int]] | None:
    """``samples=PATH``: (N, (C, H, W)) of the images it holds (None: no ``samples``).

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: not an ADM-layout ``.npz`` (``arr_0`` (N, H, W, C) uint8) or PNG folder.
    """
    path = cfg.get("samples")
    if not path:
        return None
    path = Path(str(path)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"samples={path} does not exist")
    if path.is_file() and path.suffix != ".npz":
        raise ValueError(f"samples={path}: give an .npz (ADM layout: {IMAGE_KEY} (N, H, W, C) "
                         f"uint8) or a folder of .png images")
    try:
        count, (height, width, channels) = image_count_and_shape(path)
    except ValueError as err:
        raise ValueError(f"samples={err}" if str(err).startswith(str(path)) else str(err)) \
            from None
    except Exception as err:  # not a zip, a broken header: one line naming the key
        raise ValueError(f"samples={path} is not a readable .npz: {type(err).__name__}: "
                         f"{err}") from None
    if height != width:
        raise ValueError(f"samples={path}: images are {height}x{width}; square images only")
    if count < 2:
        raise ValueError(f"samples={path} holds {count} image(s); FID needs at least 2")
    return count, (channels, height, width)


def check_ranks(world: World, num_samples: int, key: str) -> None:
    """Every rank must score at least one sample."""
    if world.size > num_samples:
        raise ValueError(f"{world.size} ranks for {key}={num_samples} samples: every rank needs "
                         f"at least one; launch at most {num_samples} ranks")


def check_adm_reference(path: str, side: int, channels: int) -> None:
    """An ADM reference batch (``mu``, ``sigma`` and ``arr_0`` images) must hold images of the
    samples' resolution: its statistics are of those images."""
    if not path or not Path(path).is_file() or Path(path).suffix != ".npz":
        return
    try:
        info = npz_array_info(path, IMAGE_KEY)
    except Exception:  # not a zip: the reference checks report it
        return
    if info is None:
        return
    shape, dtype = info
    if len(shape) != 4 or dtype.name != "uint8":
        raise ValueError(f"fid.stats_path={path}: its {IMAGE_KEY} is {dtype} {shape}, not ADM "
                         f"reference images (N, H, W, C) uint8")
    if shape[1] != side or shape[2] != side:
        raise ValueError(f"fid.stats_path={path} is an ADM reference of {shape[1]}x{shape[2]} "
                         f"images, but the samples are {side}x{side}: give the reference batch "
                         f"of this resolution")
