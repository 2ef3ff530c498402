#!/usr/bin/env bash
# Issue 27 timings (docs/benchmarks.md): tarflow-sample on 1 rank against 2 gloo ranks (1 thread
# each), a kill -9 at about half way and its resume, then tarflow-eval's time split on 1 and 2
# ranks. Run from the repository root on a quiet machine (the kill hook is a test module):
#   CK=outputs/demo/<time>/checkpoints/last.ckpt N=1024 NE=512 bash scripts/bench_sample_ranks.sh
set -u
CK=${CK:?set CK to a checkpoint}; N=${N:-1024}; SH=${SH:-32}; NE=${NE:-512}
OUT=${OUT:-/tmp/bench_sample_ranks}
export OMP_NUM_THREADS=1 WANDB_MODE=offline
rm -rf "$OUT"; mkdir -p "$OUT"
COMMON="ckpt_path=$CK num_samples=$N shard_size=$SH format=npz device=cpu progress=false paths.plan_cache=$OUT/plans.json"
TWO="torchrun --standalone --nproc-per-node=2 --no-python"
one() { tarflow-sample $COMMON hydra.run.dir=$OUT/$1 > $OUT/$1.log 2>&1; }
two() { $TWO tarflow-sample $COMMON hydra.run.dir=$OUT/$1 > $OUT/$1.log 2>&1; }
t() { local s=$(date +%s.%N); "$@"; local rc=$?; echo "$* rc=$rc wall=$(echo "$(date +%s.%N) - $s" | bc) s; load $(cut -d' ' -f1-3 /proc/loadavg)"; }
echo "start $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
t one plan_warmup  # plans once (cached in $OUT/plans.json); the timed runs below reuse the plan
t one one_a; t two two_a; t two two_b; t one one_b
# kill -9 of torchrun and both ranks right after a rank's (N/SH/4)-th shard: about half the set
s=$(date +%s.%N)
TARFLOW_TEST_KILL_AFTER_SHARDS=$((N / SH / 4)) $TWO python -m tests.reliability.sample_kill $COMMON hydra.run.dir=$OUT/killed > $OUT/killed.log 2>&1
echo "killed rc=$? wall=$(echo "$(date +%s.%N) - $s" | bc) s; shards on disk: $(ls $OUT/killed/shards | grep -c '^[0-9]')"
s=$(date +%s.%N)
$TWO tarflow-sample $COMMON if_exists=resume hydra.run.dir=$OUT/killed > $OUT/resume.log 2>&1
echo "resume rc=$? wall=$(echo "$(date +%s.%N) - $s" | bc) s; load $(cut -d' ' -f1-3 /proc/loadavg)"
python - "$OUT" <<'PY'
import json, sys
import numpy as np
out = sys.argv[1]
z = {k: np.load(f"{out}/{k}/samples.npz") for k in ("one_a", "one_b", "two_a", "two_b", "killed")}
for k in z:
    s = json.load(open(f"{out}/{k}/sample_summary.json"))
    d = np.abs(z[k]["arr_0"].astype(int) - z["one_a"]["arr_0"].astype(int)).max()
    print(k, "ranks", s["ranks"], "wall_s %.1f" % s["wall_seconds"],
          "img/s %.2f" % (s["num_samples"] / s["wall_seconds"]), "schedule", s["schedule"],
          "max|diff| vs one_a", d, "labels equal", bool((z[k]["arr_1"] == z["one_a"]["arr_1"]).all()),
          "drawn", s["drawn_by_this_job"])
print("killed+resumed == two_a bit for bit:",
      all((z["killed"][k] == z["two_a"][k]).all() for k in ("arr_0", "arr_1", "indices")))
PY
# tarflow-eval: the first run computes and caches the reference's features; then 2, 1 ranks.
EVAL="ckpt_path=$CK fid.num_samples=$NE bpd.enabled=false device=cpu progress=false paths.plan_cache=$OUT/plans.json"
t tarflow-eval $EVAL hydra.run.dir=$OUT/eval_warm > $OUT/eval_warm.log 2>&1
t $TWO tarflow-eval $EVAL hydra.run.dir=$OUT/eval_two > $OUT/eval_two.log 2>&1
t tarflow-eval $EVAL hydra.run.dir=$OUT/eval_one > $OUT/eval_one.log 2>&1
python - "$OUT" <<'PY'
import json, sys
for k in ("eval_warm", "eval_two", "eval_one"):
    e = json.load(open(f"{sys.argv[1]}/{k}/eval.json"))
    print(k, {m: e[m] for m in e if m.startswith("val/")}, "seconds", e.get("seconds"))
PY
echo "end $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
