"""Training a small KL autoencoder (diffusers ``AutoencoderKL``) for a latent demo.

The recipe: mean squared reconstruction error of the images in [-1, 1] plus a small KL term
towards N(0, I), AdamW with a linear warm-up and cosine decay. ``tarflow-train-ae`` calls these
with the digits; a notebook can call them with any image tensor.
"""

from __future__ import annotations

import math

import torch


def fit(vae: torch.nn.Module, train: torch.Tensor, *, steps: int, batch_size: int, lr: float,
        kl_weight: float, seed: int = 0, progress: bool = False) -> list[float]:
    """Train ``vae`` in place on images (M, C, H, W) in [-1, 1]; returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    steps_iter = range(steps)
    if progress:
        from tqdm.auto import tqdm

        steps_iter = tqdm(steps_iter, desc="autoencoder", unit="step")
    losses = []
    vae.train()
    for _ in steps_iter:
        x = train[torch.randint(len(train), (batch_size,), generator=gen)]
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        # The KL of N(mu, s^2) from N(0, 1) per latent dimension.
        kl = 0.5 * (dist.mean.pow(2) + dist.var - 1 - dist.logvar).mean()
        loss = (recon - x).pow(2).mean() + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress:
            steps_iter.set_postfix(loss=f"{losses[-1]:.4f}")
    vae.eval()
    return losses


@torch.no_grad()
def latent_moments(vae: torch.nn.Module, images: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of the posterior means over all images and dimensions."""
    means = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean
                       for i in range(0, len(images), 256)])
    return float(means.mean()), float(means.std())


@torch.no_grad()
def reconstruction_error(vae: torch.nn.Module, images: torch.Tensor) -> float:
    """Mean squared error of decode(mean of encode(x)) in [-1, 1] units."""
    recon = vae.decode(vae.encode(images).latent_dist.mean).sample
    return float((recon.clamp(-1, 1) - images).pow(2).mean())
