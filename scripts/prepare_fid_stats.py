#!/usr/bin/env python
"""Compute and cache FID reference statistics for a dataset at one resolution.

The validation callback and ``tarflow-eval`` compute these on first use; running this beforehand
keeps that cost (Inception at 299x299: ~4 images/s on 2 CPU cores, hundreds per second on a GPU)
out of the first training run. The file name and its meta tags match what they expect, so they
pick it up without recomputing:

    python scripts/prepare_fid_stats.py --dataset demo --img-size 16 --channels 1 --count 300
    python scripts/prepare_fid_stats.py --dataset imagenet64 --root /data/imagenet64 \\
        --img-size 64 --count 50000 --device cuda

Writes ``<out-dir>/<dataset>_<S>px_c<C>_<split><count>.npz`` (``--out`` to choose the file).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from tarflow.data import build_dataset
from tarflow.eval import InceptionFeatures, ReferenceStats
from tarflow.eval.fid_reference import reference_stats, stats_file_name

DEFAULT_OUT_DIR = Path("data") / "fid_stats"  # = ${paths.fid_stats_dir} run from the repo root


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="The same subset (first COUNT of a SEED permutation) is "
                                "used by training-time FID and tarflow-eval.")
    p.add_argument("--dataset", required=True,
                   help="demo | fake | imagenet64 | imagenet128 | afhq")
    p.add_argument("--root", help="dataset root (imagenet / afhq)")
    p.add_argument("--img-size", type=int, required=True, help="image side S")
    p.add_argument("--channels", type=int, default=3, help="image channels (demo: 1)")
    p.add_argument("--split", default="train", help="dataset split (default: train)")
    p.add_argument("--count", type=int, default=300, help="images to use (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="subset permutation seed (default: 0)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                   help=f"directory of the cache (default: {DEFAULT_OUT_DIR})")
    p.add_argument("--out", type=Path, help="exact output file (overrides --out-dir)")
    p.add_argument("--weights", help="Inception weights file (default: torch hub's "
                   "checkpoints dir or $TARFLOW_INCEPTION_WEIGHTS)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--force", action="store_true", help="recompute even if a valid cache exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ds = build_dataset(args.dataset, root=args.root, img_size=args.img_size,
                           split=args.split, channels=args.channels, flip=False)
        extractor = InceptionFeatures(args.weights, batch_size=args.batch_size).to(args.device)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    path = args.out or args.out_dir / stats_file_name(args.dataset, args.img_size, args.channels,
                                                      args.split, args.count)
    if args.force:
        path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    stats: ReferenceStats = reference_stats(path, ds, extractor, split=args.split,
                                            count=args.count, seed=args.seed,
                                            batch_size=args.batch_size, device=args.device,
                                            progress=not args.no_progress)
    # The file read or written: named for the images it holds when fewer exist than asked for.
    where = stats.meta.get("path", path)
    print(f"{where}: statistics of {stats.count} of the {len(ds)} {args.dataset}/{args.split} "
          f"images, {stats.num_features} features, {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
