"""The FID reference statistics of a training run: computed or loaded on rank zero, announced,
and recorded with the run's hyper-parameters (the statistics themselves:
:mod:`tarflow.eval.fid_reference`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from tarflow.eval.fid_reference import reference_path, reference_provenance, reference_stats
from tarflow.eval.references import ReferenceStats, reference_format


def logged_reference_stats(path: str | Path, dataset: Dataset, extractor: Callable,
                           loggers: Sequence[Logger], **kwargs: Any) -> ReferenceStats:
    """:func:`reference_stats` for a training run (rank zero): says where the statistics come
    from, and records their provenance with the run's hyper-parameters (``fid_reference``),
    so every ``val/fid_<N>`` of the run names what it was measured against.

    Args:
        path, dataset, extractor, **kwargs: as for :func:`reference_stats`.
        loggers: the trainer's loggers.
    """
    if reference_format(path) in (None, "tarflow-npz"):
        path, held = reference_path(path, dataset, split=kwargs["split"], count=kwargs["count"],
                                    quiet=True)  # reference_stats warns
        if not Path(path).is_file():
            rank_zero_info(f"FID reference statistics: computing {path} from {held} "
                           f"{kwargs['split']} images")
    reference = reference_stats(path, dataset, extractor, **kwargs)  # warns if few images
    rank_zero_info(f"FID reference statistics: {reference.describe()}")
    for logger in loggers:
        logger.log_hyperparams({"fid_reference": reference_provenance(reference)})
    return reference

