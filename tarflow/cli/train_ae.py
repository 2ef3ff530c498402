"""``tarflow-train-ae``: train a small KL autoencoder (diffusers ``AutoencoderKL``) for a latent
demo, and save it where ``model.autoencoder.path`` of ``experiment=demo_latent`` looks.

Example::

    tarflow-train-ae              # the digits, 16x16x1 -> 8x8x4, into outputs/autoencoders/demo
    tarflow-train-ae --steps 300 --out /tmp/ae --force

Real runs use a pretrained autoencoder (Stable Diffusion's ``stabilityai/sd-vae-ft-ema``); this
command exists so that the whole latent path (encode, train the flow, sample, decode, FID) runs
offline on a laptop. The recipe: mean squared reconstruction error of the images in [-1, 1] plus
a small KL term towards N(0, I) (``--kl-weight``), AdamW with a cosine decay. Afterwards the
posterior means of the training images fix ``shift_factor`` (their mean) and ``scaling_factor``
(one over their standard deviation), stored in the autoencoder's own config as Stable
Diffusion's 0.18215 is in its, so the flow sees latents of mean 0 and variance 1.

The directory is built through ``tarflow.files.atomic_dir`` (a hidden sibling renamed into
place), so an interrupted run leaves no half-written autoencoder; an existing one is refused
unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from tarflow.app.checks.common import refuse_low_counts
from tarflow.app.cli_args import ExamplesFormatter
from tarflow.app.errors import fail
from tarflow.data import build_dataset
from tarflow.files import atomic_dir
from tarflow.model.autoencoder import small_autoencoder
from tarflow.model.autoencoder_fit import fit, latent_moments, reconstruction_error


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tarflow-train-ae",
        description="Train a small diffusers AutoencoderKL on an in-memory dataset (the digits "
        "by default) and save it with save_pretrained for a latent demo (experiment="
        "demo_latent reads outputs/autoencoders/demo).",
        epilog="examples:\n"
        "  tarflow-train-ae                      # the digits, 16x16x1 -> 8x8x4, into "
        "outputs/autoencoders/demo\n"
        "  tarflow-train-ae --steps 300 --out /tmp/ae --force\n"
        "  tarflow-encode experiment=demo_latent && tarflow-train experiment=demo_latent"
        "   # then",
        formatter_class=ExamplesFormatter)
    p.add_argument("--data", default="demo", help="dataset registry name (default: demo)")
    p.add_argument("--root", help="dataset root for datasets on disk")
    p.add_argument("--img-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=1, help="image channels")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64], help="encoder widths; "
                   "the image side is divided by 2^(len - 1): 16x16 -> 8x8 with two")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the mean KL "
                   "divergence per latent dimension against the mean squared error per pixel")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default="outputs/autoencoders/demo", help="output directory")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true")
    return p


def _images(name: str, root: str | None, img_size: int, channels: int, split: str):
    ds = build_dataset(name, root=root, img_size=img_size, split=split, channels=channels,
                       flip=False)
    images = getattr(ds, "images", None)
    if images is None:  # datasets without an in-memory tensor: read every item once
        images = torch.stack([ds[i][0] for i in range(len(ds))])
    return images.float()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out).expanduser()
    if out.exists() and not args.force:
        fail(f"--out {out} already exists; pass --force to replace it, or choose another --out")
    refuse_low_counts(args, {"steps": 1, "batch_size": 1, "latent_channels": 1})
    if args.img_size % 2 ** (len(args.widths) - 1):
        fail(f"--img-size {args.img_size} is not divisible by 2^{len(args.widths) - 1}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        train = _images(args.data, args.root, args.img_size, args.channels, "train")
        val = _images(args.data, args.root, args.img_size, args.channels, "val")
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    vae = small_autoencoder(image_channels=args.channels, latent_channels=args.latent_channels,
                            widths=tuple(args.widths), sample_size=args.img_size, seed=args.seed)
    t0 = time.perf_counter()
    losses = fit(vae, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                 kl_weight=args.kl_weight, seed=args.seed, progress=not args.no_progress)
    mean, std = latent_moments(vae, train)
    vae.register_to_config(scaling_factor=1.0 / std, shift_factor=mean)
    mse = reconstruction_error(vae, val)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:  # a crash leaves any earlier autoencoder at --out untouched
        vae.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps({
            **{k: v for k, v in vars(args).items() if k not in ("force", "no_progress")},
            "first_loss": losses[0], "final_loss": losses[-1], "val_mse": mse,
            "val_psnr_db": 10 * math.log10(4.0 / max(mse, 1e-12)),
            "shift_factor": mean, "scaling_factor": 1.0 / std,
            "seconds": time.perf_counter() - t0}, indent=2))
    side = args.img_size // 2 ** (len(args.widths) - 1)
    print(f"autoencoder {args.img_size}x{args.img_size}x{args.channels} -> {side}x{side}x"
          f"{args.latent_channels} trained for {args.steps} steps in "
          f"{time.perf_counter() - t0:.0f} s: val reconstruction MSE {mse:.4f} "
          f"(PSNR {10 * math.log10(4.0 / max(mse, 1e-12)):.1f} dB on [-1, 1]); latents scaled "
          f"by {1.0 / std:.4f} after a shift of {mean:.4f}; saved to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
