"""``tarflow-export CKPT OUT``: write a checkpoint's network in the official TarFlow format.

The official code (apple/ml-tarflow, and the GS-Jacobi authors' scripts built on it) loads a plain
``state_dict`` ``.pth`` and builds its model from the numbers in the file name
``{dataset}_model_{P}_{Ch}_{T}_{K}_{sigma:.2f}.pth``; it rejects our Lightning checkpoints and
``.pt`` files. This command writes exactly that file (EMA or raw weights), plus
``<name>.json`` beside it with the architecture and where the weights came from, and refuses
in one ``error: ...`` line (exit status 2) anything the official model cannot express
(:func:`tarflow.model.official.official_problems`), before writing anything. An existing file is
never replaced without ``--force``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tarflow.app.checks.common import refuse_unwritable
from tarflow.app.errors import fail
from tarflow.files import atomic_torch_save, atomic_write
from tarflow.model.checkpoint import CheckpointError
from tarflow.model.official import (
    official_config,
    official_name,
    official_problems,
    read_for_export,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tarflow-export",
        description="Write a checkpoint's weights as an official TarFlow .pth (a plain state "
        "dict that apple/ml-tarflow loads with strict=True), plus a JSON of its config beside "
        "it. Reads our Lightning .ckpt (also FSDP's sharded checkpoint directories), our .pt "
        "files and official .pth files.",
        epilog="examples:\n"
        "  tarflow-export outputs/demo/<time>/checkpoints/last.ckpt exports/\n"
        "      -> exports/demo_model_2_128_4_2_0.05.pth and .json beside it\n"
        "  tarflow-export last.ckpt raw.pth --weights raw\n"
        "  TarFlow.from_checkpoint('exports/demo_model_2_128_4_2_0.05.pth') loads it back.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", help="a Lightning .ckpt (file or FSDP sharded "
                   "directory), a .pt of ours or an official .pth")
    p.add_argument("out", metavar="OUT", help="an existing directory (or one ending in '/'), "
                   "where the file gets its official name, or a path ending in .pth")
    p.add_argument("--weights", choices=["ema", "raw"], default=None,
                   help="which weights of a Lightning checkpoint (default: EMA where the run "
                   "had the EMA callback, else the raw weights)")
    p.add_argument("--dataset", default=None,
                   help="dataset part of the official name (default: the dataset the "
                   "checkpoint records, e.g. demo, imagenet64, afhq)")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    return p


def _dataset_name(args: argparse.Namespace, obj: dict) -> str:
    if args.dataset:
        return args.dataset
    meta = obj.get("tarflow") if isinstance(obj.get("tarflow"), dict) else {}
    hparams = obj.get("hyper_parameters") if isinstance(obj.get("hyper_parameters"), dict) else {}
    data = meta.get("data") or hparams.get("data") or {}
    if isinstance(data, dict) and data.get("name"):
        return str(data["name"])
    fail(f"{args.checkpoint} records no dataset; name it with --dataset (e.g. imagenet64)")


def _output_path(out: str, name: str) -> Path:
    path = Path(out).expanduser()
    if path.is_dir() or out.endswith(("/", "\\")):
        return path / name
    if path.suffix != ".pth":
        fail(f"OUT {out} is neither a directory nor a .pth file; give a directory (the file gets "
             f"the official name {name}) or a path ending in .pth")
    return path


def _record(args: argparse.Namespace, obj: dict, config: Any, which: str | None,
            dataset: str, path: Path) -> dict[str, Any]:
    """The JSON written beside the export: enough to rebuild the official model and to trace
    the weights back to their run."""
    meta = obj.get("tarflow") if isinstance(obj.get("tarflow"), dict) else {}
    return {
        "format": "tarflow-official-state-dict",
        "file": path.name,
        "dataset": dataset,
        "architecture": config.to_dict(),
        "tag": config.tag,
        "num_patches": config.num_patches,
        "token_dim": config.token_dim,
        "weights": which or "unrecorded",
        "source": str(Path(args.checkpoint).expanduser().resolve()),
        "epoch": obj.get("epoch"),
        "global_step": obj.get("global_step"),
        "run_id": meta.get("run_id"),
        "data": meta.get("data"),
        # A latent model's flow is exported alone; these latents need this autoencoder.
        "autoencoder": meta.get("autoencoder"),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kind = "files" if args.out.endswith(".pth") else "folders"  # see the OUT help
    refuse_unwritable(args, **{kind: {"out": "OUT"}})
    try:
        sd, stored, which, obj = read_for_export(args.checkpoint, args.weights)
        problems = official_problems(sd, stored)
        if problems:
            fail(f"{args.checkpoint} cannot be exported to the official format: "
                 + "; ".join(problems))
        config = official_config(sd, stored)
    except (CheckpointError, ValueError) as err:
        fail(str(err))
    dataset = _dataset_name(args, obj)
    try:
        name = official_name(dataset, config)
    except ValueError as err:
        fail(f"--dataset: {err}")
    path = _output_path(args.out, name)
    record_path = path.with_suffix(".json")
    existing = [str(p) for p in (path, record_path) if p.exists()]
    if existing and not args.force:
        fail(f"{' and '.join(existing)} already exist(s); pass --force to replace")
    atomic_torch_save(sd, path)
    record = _record(args, obj, config, which, dataset, path)
    atomic_write(record_path, json.dumps(record, indent=2))
    size = sum(v.numel() * v.element_size() for v in sd.values()) / 2**20
    print(f"wrote {path} ({which or 'unrecorded'} weights of {config.tag}, {size:.1f} MiB) "
          f"and {record_path.name}")
    if record.get("autoencoder"):
        print(f"note: a latent model: the official code samples its {config.in_channels}x"
              f"{config.img_size}x{config.img_size} latents; decode them with the autoencoder "
              f"recorded in {record_path.name}")
    if path.name != name:
        print(f"note: the official code reads the architecture from the file name; "
              f"the official name is {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
