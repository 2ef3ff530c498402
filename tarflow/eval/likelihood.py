"""Likelihood of a dataset under a model: bits/dim (pixel models) or latent NLL (latent models).

Both are means over (the first ``max_images`` of) a dataset with per-image seeded noise: image
``j`` draws its dequantisation (or latent) noise from a CPU generator seeded ``seed + j``, so
the number depends on neither the device nor the batch size::

    bits_per_dim(net, build_dataset("demo", img_size=16, split="val", channels=1),
                 batch_size=256)["val/bpd"]
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from tarflow.data import gaussian_noise, uniform_dequantize
from tarflow.data.subsets import stack_items
from tarflow.model.space import PixelSpace
from tarflow.model.tarflow import TarFlow


def progress_bar(iterable, total: int, enabled: bool, desc: str):
    """tqdm over ``iterable`` when enabled (long evaluations show where they are)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch")


def _mean_over(dataset: Dataset, score: Callable, *, batch_size: int, max_images: int | None,
               progress: bool, desc: str,
               shard: tuple[int, int] = (0, 1)) -> tuple[float, int, float]:
    """(mean of ``score(x, y, start)`` over the first ``max_images`` items, items, seconds);
    ``shard`` = (rank, ranks): only every ranks-th batch from the rank-th (the noise of image
    j depends on j alone, so the ranks' means weighted by their items give the whole mean)."""
    count = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    total, seen = 0.0, 0
    t0 = time.perf_counter()
    starts = range(0, count, batch_size)[shard[0]::shard[1]]
    for start in progress_bar(starts, len(starts), progress, desc):
        x, y = stack_items(dataset, range(start, min(start + batch_size, count)))
        values = score(x, y, start)  # (B,)
        total += float(values.double().sum())
        seen += values.shape[0]
    return total / max(seen, 1), seen, time.perf_counter() - t0


def _per_image(x: torch.Tensor, seed: int, start: int, noise: Callable) -> torch.Tensor:
    """``noise(x_j, generator)`` for each image j of a batch, its CPU generator seeded
    ``seed + start + j``: the result depends on neither the device nor the batch size."""
    gens = [torch.Generator().manual_seed(seed + start + j) for j in range(x.shape[0])]
    return torch.cat([noise(x[j:j + 1], g) for j, g in enumerate(gens)])


@torch.no_grad()
def bits_per_dim(net: TarFlow, dataset: Dataset, *, batch_size: int,
                 max_images: int | None = None, seed: int = 0,
                 progress: bool = False,
                 shard: tuple[int, int] = (0, 1)) -> dict[str, float]:
    """Mean ``val/bpd`` over (the first ``max_images`` of) a dataset, uniform dequantisation;
    also the images scored (``bpd_images``) and the seconds taken (``bpd_seconds``)."""
    param = next(net.parameters())

    def score(x, y, start):
        x = _per_image(x, seed, start, uniform_dequantize)
        labels = y.to(param.device) if net.config.conditional else None
        return net.bits_per_dim(x.to(param.device, param.dtype), labels)

    mean, seen, seconds = _mean_over(dataset, score, batch_size=batch_size,
                                     max_images=max_images, progress=progress, desc="bpd",
                                     shard=shard)
    return {"val/bpd": mean, "bpd_images": seen, "bpd_seconds": seconds}


@torch.no_grad()
def latent_nll(net: TarFlow, space: PixelSpace, dataset: Dataset, *, batch_size: int,
               max_images: int | None = None, seed: int = 0,
               progress: bool = False, shard: tuple[int, int] = (0, 1)) -> dict[str, float]:
    """Mean ``val/latent_nll`` of a latent model: images encoded by its autoencoder, plus the
    training noise sigma in latent space, scored by the flow in nats per latent dimension (the
    training objective; a latent model has no pixel bits/dim)."""
    param = next(net.parameters())
    sigma = float(net.config.noise_std)

    def score(x, y, start):
        z = space.flow_inputs(x.to(param.device)).float().cpu()  # (B, c, h, w)
        z = _per_image(z, seed, start, lambda zj, g: gaussian_noise(zj, sigma, g))
        labels = y.to(param.device) if net.config.conditional else None
        return net.nll(z.to(param.device, param.dtype), labels)

    mean, seen, seconds = _mean_over(dataset, score, batch_size=batch_size,
                                     max_images=max_images, progress=progress,
                                     desc="latent nll", shard=shard)
    return {"val/latent_nll": mean, "latent_nll_images": seen, "latent_nll_seconds": seconds}


def likelihood(net: TarFlow, space: PixelSpace, dataset: Dataset, **kwargs) -> dict[str, float]:
    """The likelihood pass a model has: pixel bits/dim, or a latent model's latent NLL."""
    if space.latent:
        return latent_nll(net, space, dataset, **kwargs)
    return bits_per_dim(net, dataset, **kwargs)
