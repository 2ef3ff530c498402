"""Image preprocessing (PIL -> tensor in [-1, 1]) and batch-level augmentations.

The per-image pipeline is the paper's: Resize -> CenterCrop -> (RandomHorizontalFlip) ->
ToTensor -> Normalize(0.5, 0.5). The batch functions are pure torch and take an optional
``torch.Generator`` so training noise can be made reproducible without touching global RNG.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms as T

__all__ = [
    "ConvertMode",
    "drop_labels",
    "gaussian_noise",
    "image_transform",
    "resize_crop",
    "uint8_to_signed",
    "uniform_dequantize",
]

# PIL modes for the channel counts we support.
_MODES = {1: "L", 3: "RGB"}


class ConvertMode:
    """Convert a PIL image to ``"L"`` (1 channel) or ``"RGB"`` (3 channels).

    A class rather than a lambda so the transform pickles into DataLoader worker processes.
    Grayscale, RGBA, palette, CMYK, 16-bit etc. all go through ``PIL.Image.convert``, which is
    what torchvision's own loader does (alpha is dropped, not composited).

    Args:
        channels: 1 or 3.
    """

    def __init__(self, channels: int = 3) -> None:
        if channels not in _MODES:
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.mode = _MODES[channels]

    def __call__(self, img: Image.Image) -> Image.Image:
        # Palette images that carry transparency warn when converted straight to RGB; going
        # through RGBA first gives the same colours without the warning.
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


def resize_crop(img_size: int, *, channels: int = 3) -> T.Compose:
    """The deterministic PIL -> PIL head of :func:`image_transform`: mode, short-side resize to
    S, centre crop to S x S.

    ``tarflow-prepare`` stores exactly this (as uint8), so a prepared image folder yields the
    tensors the folder reader would, without decoding a JPEG per item.

    Args:
        img_size: output side length S.
        channels: 1 (grayscale) or 3 (RGB).
    """
    if img_size < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")
    return T.Compose([ConvertMode(channels), T.Resize(img_size), T.CenterCrop(img_size)])


def image_transform(
    img_size: int, *, train: bool, flip: bool = True, channels: int = 3
) -> T.Compose:
    """Build the paper's PIL -> tensor preprocessing.

    Args:
        img_size: output side length S.
        train: training mode; enables the random horizontal flip (if ``flip``).
        flip: allow the random horizontal flip in training mode.
        channels: 1 (grayscale) or 3 (RGB); the input is converted to match.

    Returns:
        A callable mapping a PIL image of any mode and size to a float32 tensor (channels, S, S)
        with values in [-1, 1].
    """
    steps: list = list(resize_crop(img_size, channels=channels).transforms)
    if train and flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize([0.5] * channels, [0.5] * channels)]
    return T.Compose(steps)


def uint8_to_signed(x: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels to float32 in [-1, 1] exactly as ``ToTensor`` + ``Normalize(0.5, 0.5)``.

    The same operations in the same order, so readers that skip PIL (e.g. the ``.npz`` reader)
    produce bit-identical tensors to the image-folder reader.

    Args:
        x: uint8 tensor of any shape, e.g. (C, H, W).

    Returns:
        float32 tensor of the same shape, values in [-1, 1].
    """
    return x.to(torch.float32).div(255).sub(0.5).div(0.5)


def gaussian_noise(
    x: torch.Tensor, std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Add i.i.d. Gaussian noise: ``x + std * eps`` with ``eps ~ N(0, I)``.

    Args:
        x: float tensor of any shape, e.g. a batch (B, C, H, W).
        std: noise standard deviation (>= 0); 0 returns ``x`` unchanged.
        generator: optional RNG; it must live on ``x.device``.

    Returns:
        Tensor shaped like ``x``.
    """
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    if std == 0:
        return x
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + std * eps


def uniform_dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace 8-bit pixel values by a uniform sample inside their quantisation bin.

    ``x`` is assumed to come from uint8 data mapped to [-1, 1]; the integer level is recovered
    as ``k = round((x + 1) * 127.5)`` and the result is ``((k + u) / 256) * 2 - 1`` with
    ``u ~ U[0, 1)``, i.e. a continuous value in [-1, 1).

    Args:
        x: float tensor of any shape, e.g. (B, C, H, W), values in [-1, 1].
        generator: optional RNG; it must live on ``x.device``.

    Returns:
        Tensor shaped like ``x`` with values in [-1, 1).
    """
    # Clamping guards against inputs that drifted slightly outside [-1, 1] (e.g. after noise).
    levels = torch.round((x + 1) * 127.5).clamp_(0, 255)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return ((levels + u) / 256) * 2 - 1


def drop_labels(
    y: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label by -1 (the "null class") with probability ``p``.

    Used for classifier-free guidance training.

    Args:
        y: int64 labels of any shape, usually (B,).
        p: drop probability in [0, 1]; 0 returns ``y`` unchanged.
        generator: optional RNG; it must live on ``y.device``.

    Returns:
        Labels shaped like ``y``, with dropped entries set to -1.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label drop probability must be in [0, 1], got {p}")
    if p == 0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, -1), y)
