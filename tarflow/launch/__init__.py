"""The launch wrappers, shipped inside the package so users of the wheel have them.

``torchrun.sh`` starts N processes of ``tarflow-train``, ``tarflow-sample`` or ``tarflow-eval`` on
one node (or several) with one run directory; ``slurm.sbatch`` does the same as a SLURM job (one
task per GPU). ``tarflow-launch`` (or ``python -m tarflow.launch``) runs or locates them::

    tarflow-launch torchrun sample ckpt_path=... num_samples=50000 format=npz
    sbatch "$(tarflow-launch path slurm)" sample ckpt_path=... num_samples=50000 format=npz
    tarflow-launch show slurm > my_job.sbatch      # a copy to edit (#SBATCH lines)

``scripts/launch/`` in the checkout hands over to these files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

WRAPPERS = {"torchrun": "torchrun.sh", "slurm": "slurm.sbatch"}
USAGE = """usage: tarflow-launch torchrun [train|sample|eval] OVERRIDES...   run under torchrun
       tarflow-launch path {torchrun,slurm}                          print the wrapper's path
       tarflow-launch show {torchrun,slurm}                          print the wrapper

  tarflow-launch torchrun train experiment=img64_cond data.root=/data/imagenet64
  NPROC=8 tarflow-launch torchrun sample ckpt_path=run/checkpoints/last.ckpt num_samples=50000
  sbatch "$(tarflow-launch path slurm)" eval ckpt_path=run/checkpoints/last.ckpt
Environment: NPROC, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, RUN_DIR, TASK, TRAINER
(see the wrapper: tarflow-launch show torchrun)."""


def wrapper(name: str) -> Path:
    """The installed wrapper ``torchrun`` or ``slurm``."""
    if name not in WRAPPERS:
        raise ValueError(f"no launch wrapper {name!r}; choose one of {sorted(WRAPPERS)}")
    return Path(__file__).with_name(WRAPPERS[name])


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    action, rest = args[0], args[1:]
    if action in ("path", "show") and len(rest) == 1 and rest[0] in WRAPPERS:
        path = wrapper(rest[0])
        print(path if action == "path" else path.read_text(), end="\n" if action == "path" else "")
        return 0
    if action == "torchrun":
        os.execvp("bash", ["bash", str(wrapper("torchrun")), *rest])
    print(f"error: unknown arguments {' '.join(args)!r}\n{USAGE}", file=sys.stderr)
    return 2
