"""Shared argparse pieces of the Hydra-free commands (tarflow-rank, tarflow-bench,
tarflow-fid-weights, tarflow-train-ae)."""

from __future__ import annotations

import argparse

import torch

from tarflow.app.errors import fail
from tarflow.data import ALIASES, DATASETS, DataError, dataset_name
from tarflow.model import PRESETS, CheckpointError, TarFlow, preset
from tarflow.model.autoencoder import AutoencoderError
from tarflow.model.loading import DTYPES, load_for_sampling
from tarflow.model.space import PixelSpace
from tarflow.sampling.choose import probe_batch


class ExamplesFormatter(argparse.HelpFormatter):
    """argparse's help, except that an epilog starting with ``example`` keeps its lines (the
    description is still wrapped, unlike with ``RawDescriptionHelpFormatter``)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", help="official .pth, Lightning .ckpt or our .pt "
                        "file (or use --preset for randomly initialised weights)")
    parser.add_argument("--preset", help="build a fresh model from a preset "
                        f"({', '.join(sorted(PRESETS))}) or a P-Ch-T-K tag instead of loading "
                        "a checkpoint (benchmark the cost of an architecture)")
    parser.add_argument("--init-std", type=float, default=0.02, help="with --preset: std of the "
                        "random proj_out weights (a zero proj_out is the trivial identity)")
    parser.add_argument("--head-dim", type=int, help="attention head width if the checkpoint "
                        "carries no config (official files: 64, the default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--autoencoder-path", help="latent models: a copy of the checkpoint's "
                        "autoencoder where its recorded path is not on this machine")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=sorted(DATASETS), type=dataset_name,
                        help="dataset for the CRM/IGM probe batch (default: the model's own "
                        f"samples); also {aliases()}")
    parser.add_argument("--root", help="dataset root for imagenet/afhq")
    parser.add_argument("--probe", type=int, default=256, help="images in the probe batch "
                        "(the paper uses ~1000)")


def aliases() -> str:
    """``afhq256 (= afhq)``: the data config names the dataset arguments accept too."""
    return ", ".join(f"{alias} (= {name})" for alias, name in sorted(ALIASES.items()))


def model_from_args(args: argparse.Namespace) -> tuple[TarFlow, PixelSpace]:
    """The network (a checkpoint, or a fresh ``--preset``) and its space, on ``--device``."""
    torch.manual_seed(args.seed)
    if args.preset:
        try:
            model = TarFlow(preset(args.preset))
        except ValueError as err:
            fail(str(err))
        for block in model.blocks:
            torch.nn.init.normal_(block.proj_out.weight, std=args.init_std)
        model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
        return model, PixelSpace(model.config)
    if not args.checkpoint:
        fail("give a CHECKPOINT or --preset NAME")
    extra = {"head_dim": args.head_dim} if args.head_dim else {}
    try:
        loaded = load_for_sampling(args.checkpoint, device=args.device, dtype=args.dtype,
                                   autoencoder_path=args.autoencoder_path,
                                   autoencoder_key="--autoencoder-path", **extra)
    except (AutoencoderError, CheckpointError) as err:
        fail(str(err))
    return loaded.net, loaded.space


def probe_images(args: argparse.Namespace, model: TarFlow,
                 space: PixelSpace | None = None) -> tuple[torch.Tensor, str]:
    """(M, C, H, W) flow inputs for CRM/IGM (a latent model's: encoded images) and a word on
    where they came from: ``--probe`` images of ``--data``, or the model's own samples."""
    probe = {"dataset": args.data, "root": args.root, "size": args.probe, "seed": args.seed}
    try:
        images, where = probe_batch(model, probe, space)
    except (DataError, ValueError, FileNotFoundError) as err:
        # The readers name the Hydra key; here it is a flag.
        fail(str(err).replace("`data.root` config key (the `root` argument of build_dataset)",
                              "--root option").replace("data.root", "--root"))
    return images, where.replace("probe.dataset is null", "no --data given")
