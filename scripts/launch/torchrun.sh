#!/usr/bin/env bash
# The launch wrapper ships inside the package (tarflow/launch/torchrun.sh, also reachable as
# `tarflow-launch torchrun ...` after `pip install`); this copy of the checkout hands over to it.
#   scripts/launch/torchrun.sh experiment=img64_cond data.root=/data/imagenet64
#   scripts/launch/torchrun.sh sample ckpt_path=run/checkpoints/last.ckpt num_samples=50000
# See tarflow/launch/torchrun.sh for the environment variables (NPROC, NNODES, RUN_DIR, ...).
exec bash "$(dirname "$0")/../../tarflow/launch/torchrun.sh" "$@"
