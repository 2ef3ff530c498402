#!/usr/bin/env bash
# Nightly: the whole test suite, slow tests included (CI runs `-m "not slow and not gpu"`).
# GPU tests stay out; run them on a GPU machine with `python -m pytest -m gpu`.
#
# Usage: scripts/nightly.sh [extra pytest arguments]
# Offline W&B: tests must not need a key or a network (a run without a mode would fail fast
# with "No API key configured").
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline
export WANDB_SILENT=true
# -m given here replaces the "not slow and not gpu" selection from pyproject's addopts.
exec python -m pytest -m "not gpu" --durations=20 "$@"
