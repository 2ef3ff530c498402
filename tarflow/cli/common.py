"""Shared argparse pieces of the Hydra-free CLIs (tarflow-rank, tarflow-bench)."""

from __future__ import annotations

import argparse

import torch

from tarflow.app.errors import fail
from tarflow.model import CheckpointError, TarFlow, describe_checkpoint, preset
from tarflow.model.autoencoder import AutoencoderError, locate
from tarflow.model.space import PixelSpace, make_space


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", help="official .pth, Lightning .ckpt or our .pt "
                        "file (or use --preset for randomly initialised weights)")
    parser.add_argument("--preset", help="build a fresh model from a preset/P-Ch-T-K tag instead "
                        "of loading a checkpoint (benchmark the cost of an architecture)")
    parser.add_argument("--init-std", type=float, default=0.02, help="with --preset: std of the "
                        "random proj_out weights (a zero proj_out is the trivial identity)")
    parser.add_argument("--head-dim", type=int, help="attention head width if the checkpoint "
                        "carries no config (official files: 64, the default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--autoencoder-path", help="latent models: a copy of the checkpoint's "
                        "autoencoder where its recorded path is not on this machine")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="dataset for the CRM/IGM probe batch: demo, fake, "
                        "imagenet64, imagenet128, afhq (default: the model's own samples)")
    parser.add_argument("--root", help="dataset root for imagenet/afhq")
    parser.add_argument("--probe", type=int, default=256, help="images in the probe batch "
                        "(the paper uses ~1000)")


def load_model(args: argparse.Namespace) -> TarFlow:
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    if args.preset:
        try:
            model = TarFlow(preset(args.preset))
        except ValueError as err:
            fail(str(err))
        for block in model.blocks:
            torch.nn.init.normal_(block.proj_out.weight, std=args.init_std)
    elif args.checkpoint:
        extra = {"head_dim": args.head_dim} if args.head_dim else {}
        try:
            model = TarFlow.from_checkpoint(args.checkpoint, **extra)
        except CheckpointError as err:
            fail(str(err))
    else:
        fail("give a CHECKPOINT or --preset NAME")
    return model.to(device=args.device, dtype=dtype).eval()


def load_space(args: argparse.Namespace, model: TarFlow) -> PixelSpace:
    """Pixels, or the autoencoder a latent checkpoint records (``--autoencoder-path``: a copy
    of it), checked to be on this machine now rather than at the first decode."""
    if not args.checkpoint or args.preset:
        return PixelSpace(model.config)
    try:
        space = make_space(model.config, describe_checkpoint(args.checkpoint).autoencoder,
                           path=args.autoencoder_path)
        if space.latent:
            locate(space.record, args.autoencoder_path, key="--autoencoder-path")
    except (AutoencoderError, CheckpointError) as err:
        fail(str(err))
    return space.to(args.device)


def probe_images(args: argparse.Namespace, model: TarFlow,
                 space: PixelSpace | None = None) -> tuple[torch.Tensor, str]:
    """(M, C, H, W) flow inputs for CRM/IGM (a latent model's: encoded images) and a word on
    where they came from."""
    space = space or PixelSpace(model.config)
    if args.data:
        from tarflow.data import build_dataset

        channels, side, _ = space.image_shape
        try:
            ds = build_dataset(args.data, root=args.root, img_size=side,
                               split="train", channels=channels, flip=False)
        except (ValueError, FileNotFoundError) as err:
            fail(str(err))
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(len(ds), generator=g)[: args.probe].tolist()
        images = space.flow_inputs(torch.stack([ds[i][0] for i in idx]).to(args.device))
        where = f"{len(idx)} {args.data} images"
    else:
        g = torch.Generator(device=args.device).manual_seed(args.seed)
        noise = model.sample_noise(args.probe, generator=g)
        images = model.reverse(noise)
        where = f"{args.probe} sequential samples of the model (no --data given)"
    return images.to(device=args.device, dtype=next(model.parameters()).dtype), where
