"""tarflow-prepare: decode a dataset once into memory-mappable uint8 arrays.

    tarflow-prepare imagenet64 /data/imagenet64_npz /data/imagenet64_prepared
    tarflow-train experiment=img64_cond data.root=/data/imagenet64_prepared

Every rank and DataLoader worker then maps the same pages of the OS page cache instead of
holding its own copy of the set (the npz reader) or decoding JPEGs every epoch (the folder
reader). The run's ``data.root`` points at the prepared directory; its manifest is how the
readers recognise it. Interrupted, the same command resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os

from tarflow.data import ALIASES, PREPARABLE, DataError, dataset_name, prepare_dataset
from tarflow.data.prepared import describe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tarflow-prepare",
        description="Turn the official ImageNet64 npz files, or an image folder (ImageNet128/"
        "256, AFHQ), into a prepared directory of uint8 arrays that training, tarflow-eval, "
        "tarflow-rank and FID statistics read through np.memmap, shared by all ranks and "
        "workers. Folder images are resized and centre-cropped once, exactly as the folder "
        "reader does. Re-running an interrupted preparation resumes it; re-running a finished "
        "one does nothing.",
        epilog="then train with data.root=OUT, e.g.  tarflow-train experiment=img64_cond "
        "data.root=OUT",
    )
    p.add_argument("name", choices=sorted(PREPARABLE), type=dataset_name,
                   help="dataset (also the data config's names: "
                   + ", ".join(f"{a} = {n}" for a, n in sorted(ALIASES.items())) + ")")
    p.add_argument(
        "source",
        help="what data.root would be for the plain reader: the directory "
        "of train_data_batch_*.npz + val_data.npz, or of train/ and val/ image folders",
    )
    p.add_argument(
        "out",
        help="the prepared directory to write (new or empty, or this same "
        "preparation's to resume it)",
    )
    p.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="training side S (default: "
        + ", ".join(f"{k} {v}" for k, v in PREPARABLE.items())
        + ")",
    )
    p.add_argument("--channels", type=int, default=3, choices=[1, 3])
    p.add_argument(
        "--splits",
        nargs="+",
        choices=["train", "val"],
        default=None,
        help="splits to prepare (default: those the source has)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes decoding folder images (default: up to 8)",
    )
    p.add_argument(
        "--chunk",
        type=int,
        default=10_000,
        help="folder images per resumable part (an npz file is one part)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm.auto import tqdm

    from tarflow.app.checks.common import refuse_unwritable

    refuse_unwritable(args, folders={"out": "OUT"})

    from tarflow.app.errors import fail

    bar = None

    def on_draft(draft: dict, state: str, copied: int) -> None:
        nonlocal bar
        total = sum(s["count"] for s in draft["splits"].values())
        word = {
            "fresh": "preparing",
            "extend": "adding splits to",
            "resume": f"resuming ({copied} copied)",
            "done": "found",
        }
        print(f"{word[state]}: {describe(draft)} -> {args.out} ({total} images)", flush=True)
        bar = tqdm(
            total=total, initial=copied, desc="preparing", unit="img", disable=state == "done"
        )

    def progress(split: str, images: int) -> None:
        bar.set_postfix_str(split, refresh=False)
        bar.update(images)

    try:
        manifest, copied = prepare_dataset(
            args.name,
            args.source,
            args.out,
            img_size=args.img_size,
            channels=args.channels,
            splits=args.splits,
            chunk=args.chunk,
            workers=args.workers,
            progress=progress,
            on_draft=on_draft,
        )
    except (DataError, FileNotFoundError, NotADirectoryError) as err:
        fail(str(err))
    finally:
        if bar is not None:
            bar.close()
    counts = ", ".join(f"{k} {v['count']}" for k, v in manifest["splits"].items())
    subs = sum(len(v.get("substituted", [])) for v in manifest["splits"].values())
    note = f"; {subs} unreadable image(s) replaced by their neighbours" if subs else ""
    print(
        f"{'prepared' if copied else 'already prepared'}: {args.out} ({counts}{note}); "
        f"train with data.root={args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
