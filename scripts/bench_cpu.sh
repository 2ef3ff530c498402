#!/usr/bin/env bash
# The CPU benchmark behind docs/benchmarks.md: the demo model, batch 1/4/16, sequential vs
# Jacobi vs GS-Jacobi (automatic and hand schedules) at the quality-equal and the exact
# operating point, FID@N of every method on the same noise; '@bf16' rows run the Jacobi
# iterations' network in bfloat16 (iterates and stopping test in float32). Run on an otherwise
# idle machine.
#
#   scripts/bench_cpu.sh outputs/demo/<stamp>/checkpoints/last.ckpt [out_dir]
#
# FID needs the demo's reference statistics (written by the demo run's sampling callback,
# or: python scripts/prepare_fid_stats.py --help) and offline Inception weights
# (tarflow-fid-weights).
set -euo pipefail
CKPT="${1:?usage: scripts/bench_cpu.sh CHECKPOINT [OUT_DIR]}"
OUT="${2:-outputs/bench}"
STATS="${FID_STATS:-data/fid_stats/demo_16px_c1_train300.npz}"
N="${FID_N:-100}"
mkdir -p "$OUT"
common=(--threads "${THREADS:-2}" --data demo --batch 1 4 16 --guidance 1.0 --denoise 1.0 --repeats 5 --warmup 2
        --fid "$N" --fid-stats "$STATS")
# Quality-equal point: tolerance 3e-3 (FID@N within 1% of sequential, see the FID lines).
tarflow-bench "$CKPT" "${common[@]}" --tol 3e-3 --concat-baseline \
  --methods jacobi jacobi@bf16 auto auto:tuned auto:tuned@bf16 "[3-2-32-64]" "[3-4-16-64]" \
  --json "$OUT/quality.json" | tee "$OUT/quality.md"
# Exact point: tolerance 1e-7 (relative error <= 1e-4 vs sequential).
tarflow-bench "$CKPT" "${common[@]}" --tol 1e-7 \
  --methods jacobi auto auto:tuned "[3-2-32-64]" --json "$OUT/exact.json" | tee "$OUT/exact.md"
