"""A checkpoint ready to sample: its network, its space (pixels or an autoencoder) and its record.

Every command that samples a file (``tarflow-sample``, ``-eval``, ``-bench``, ``-rank``) and a
notebook load it here, so the device choice, the precision and the autoencoder's whereabouts are
decided once::

    loaded = load_for_sampling("outputs/demo/<run>/checkpoints/last.ckpt")
    images, stats = sample(loaded.net, *fixed_inputs(loaded.net, range(16), seed=0))
    images = loaded.space.decode(images)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tarflow.model.autoencoder_record import locate
from tarflow.model.checkpoint import CheckpointSummary, describe_checkpoint, read_file
from tarflow.model.space import PixelSpace, make_space
from tarflow.model.student import NOT_A_FLOW, Student
from tarflow.model.tarflow import TarFlow

log = logging.getLogger(__name__)

DTYPES = ("float32", "float64", "bfloat16")


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None) is the GPU when there is one, else the CPU; other names as given."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class LoadedModel:
    """A network in eval mode, the space its samples live in, and what the file records.

    ``net`` is a :class:`TarFlow`, or a distilled :class:`~tarflow.model.student.Student`
    (``summary.kind == "student"``): it samples through the same functions (``sample``,
    ``fixed_inputs``, ``sample_set``) but has no likelihood and no schedule.
    """

    net: TarFlow | Student
    space: PixelSpace
    summary: CheckpointSummary

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device


def load_for_sampling(path: str | Path, *, device: str | torch.device | None = "auto",
                      dtype: str = "float32", autoencoder_path: str | None = None,
                      summary: CheckpointSummary | None = None,
                      autoencoder_key: str = "autoencoder_path",
                      **overrides) -> LoadedModel:
    """Load any supported checkpoint (official ``.pth``, Lightning ``.ckpt``, our ``.pt``) for
    sampling, on ``device`` in ``dtype``.

    A latent checkpoint's autoencoder is located now (its recorded path, or
    ``autoencoder_path``, a copy of it; the weights fingerprint must match), so a missing one
    fails before any sampling rather than at the first decode.

    Args:
        summary: the file's :func:`describe_checkpoint`, when a start-up check already read it
            (and located a latent model's autoencoder, which is then not hashed again).
        autoencoder_key: how error messages name ``autoencoder_path`` (``--autoencoder-path``
            in the argparse commands).
        overrides: architecture fields a bare state dict cannot tell (e.g. ``head_dim``).

    Raises:
        CheckpointError: a missing, unreadable or non-TarFlow file.
        AutoencoderError: a latent model whose autoencoder is not on this machine.
        ValueError: an empty path or an unknown dtype.
    """
    if not path:
        raise ValueError("a checkpoint path is required, e.g. <run dir>/checkpoints/last.ckpt")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    checked = summary is not None  # a start-up check read the file and located the autoencoder
    summary = summary or describe_checkpoint(path, **overrides)
    where = pick_device(device)
    space = make_space(summary.config, summary.autoencoder, path=autoencoder_path or None)
    if space.latent and not checked:  # hashing the weights again would only repeat that check
        locate(space.record, autoencoder_path or None, key=autoencoder_key)
    if summary.kind == "student":
        net = Student.from_payload(read_file(path, "cpu"))
        teacher = net.teacher
        log.warning("%s is a distilled student of %s (teacher fingerprint %s, distilled at "
                    "guidance %s): %s", Path(path).name, teacher.get("path", "?"),
                    teacher.get("fingerprint", "?"), teacher.get("guidance", "?"), NOT_A_FLOW)
    else:
        net = TarFlow.from_checkpoint(path, map_location="cpu", **overrides)
    net = net.to(device=where, dtype=getattr(torch, dtype)).eval()
    return LoadedModel(net, space.to(where), summary)
