"""Datasets and preprocessing for TarFlow (ring 1: torch / torchvision / numpy / PIL only).

Every dataset yields ``(x, y)``: x float32 (C, H, W) in [-1, 1], y an int64 scalar (0 for
unconditional data), and has ``num_classes`` (0 = unconditional), ``img_size``, ``channels`` and
``name`` attributes. :func:`build_dataset` picks one by name.
"""

from __future__ import annotations

from tarflow.data.demo import DigitsDataset
from tarflow.data.errors import DataError, DataWarning
from tarflow.data.fake import FakeImageDataset
from tarflow.data.folder import AFHQ_CLASSES, IMG_EXTENSIONS, ImageFolderDataset, afhq_dataset
from tarflow.data.imagenet_npz import ImageNetNpzDataset, export_to_folder, write_imagenet_npz
from tarflow.data.prepare import prepare_dataset
from tarflow.data.prepared import PreparedDataset, looks_prepared
from tarflow.data.registry import ALIASES, DATASETS, PREPARABLE, build_dataset, dataset_name
from tarflow.data.transforms import (
    drop_labels,
    gaussian_noise,
    image_transform,
    uint8_to_signed,
    uniform_dequantize,
)

__all__ = [
    "AFHQ_CLASSES",
    "ALIASES",
    "DATASETS",
    "IMG_EXTENSIONS",
    "PREPARABLE",
    "DataError",
    "DataWarning",
    "DigitsDataset",
    "FakeImageDataset",
    "ImageFolderDataset",
    "ImageNetNpzDataset",
    "PreparedDataset",
    "afhq_dataset",
    "build_dataset",
    "dataset_name",
    "drop_labels",
    "export_to_folder",
    "gaussian_noise",
    "image_transform",
    "looks_prepared",
    "prepare_dataset",
    "uint8_to_signed",
    "uniform_dequantize",
    "write_imagenet_npz",
]
