#!/usr/bin/env bash
# The CPU benchmark behind docs/benchmarks.md: the demo model, batch 1/4/16/64, the planner
# (`auto`, and `auto@bf16` where it may use a bf16 network) against the sequential loop, Jacobi,
# the paper's rule (`auto:paper`) and hand schedules at the quality-equal point, with FID@N of
# every method on the same noise; then the lean-iteration check (`jacobi:10` vs the plain
# fixed-iteration loop at tol 0). Run on an otherwise idle machine.
#
#   scripts/bench_cpu.sh outputs/demo/<stamp>/checkpoints/last.ckpt [out_dir]
#
# Plans are made afresh (--plan-cache ''), so each table is preceded by the plan, its
# candidates' measured costs and the planning time. FID needs the demo's reference statistics
# (written by the demo run's sampling callback, or: python scripts/prepare_fid_stats.py --help)
# and offline Inception weights (tarflow-fid-weights).
set -euo pipefail
CKPT="${1:?usage: scripts/bench_cpu.sh CHECKPOINT [OUT_DIR]}"
OUT="${2:-outputs/bench}"
STATS="${FID_STATS:-data/fid_stats/demo_16px_c1_train300.npz}"
N="${FID_N:-100}"
mkdir -p "$OUT"
common=(--threads "${THREADS:-2}" --data demo --guidance 1.0 --repeats 5 --warmup 2 --plan-cache '')
# Quality-equal point: tolerance 3e-3 (FID@N within 1% of sequential, see the FID lines).
tarflow-bench "$CKPT" "${common[@]}" --batch 1 4 16 64 --tol 3e-3 --denoise 1.0 \
  --fid "$N" --fid-stats "$STATS" \
  --methods auto auto@bf16 jacobi jacobi@bf16 auto:paper \
  "[3-2-32-64]" "[3-4-16-64]" "[3-8-32-10]" \
  --json "$OUT/quality.json" | tee "$OUT/quality.md"
# Lean iterations: 10 Jacobi iterations per block at tol 0, ours vs the plain loop.
tarflow-bench "$CKPT" "${common[@]}" --batch 1 16 --tol 0 --repeats 15 \
  --methods jacobi:10 plain:10 --json "$OUT/lean.json" | tee "$OUT/lean.md"
