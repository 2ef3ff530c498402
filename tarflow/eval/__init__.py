"""Evaluation metrics (ring 1: torch/numpy/scipy/torch-fidelity only)."""

from tarflow.eval.fid import (
    FeatureStats,
    fid_from_batches,
    frechet_distance,
    stats_from_batches,
)
from tarflow.eval.inception import (
    WEIGHTS_FILENAME,
    InceptionFeatures,
    convert_fid_helper_weights,
    default_weights_path,
    find_inception_weights,
    images_to_uint8,
)
from tarflow.eval.references import (
    ReferenceStats,
    load_or_compute_reference,
    load_reference,
    reference_format,
)

__all__ = [
    "WEIGHTS_FILENAME",
    "FeatureStats",
    "InceptionFeatures",
    "ReferenceStats",
    "convert_fid_helper_weights",
    "default_weights_path",
    "fid_from_batches",
    "find_inception_weights",
    "frechet_distance",
    "images_to_uint8",
    "load_or_compute_reference",
    "load_reference",
    "reference_format",
    "stats_from_batches",
]
