#!/usr/bin/env bash
# torchrun on one node (or several, with the usual rendezvous variables) for any tarflow command,
# with one Hydra run directory shared by every rank. Ships inside the package:
#   tarflow-launch torchrun [train|sample|eval] <overrides>      (or: python -m tarflow.launch ...)
#
#   tarflow-launch torchrun train experiment=img64_cond data.root=/data/imagenet64
#   tarflow-launch torchrun sample ckpt_path=run/checkpoints/last.ckpt num_samples=50000 format=npz
#   RUN_DIR=outputs/fid50k tarflow-launch torchrun sample ckpt_path=... num_samples=50000 \
#       format=npz if_exists=resume          # the same command again after a kill: resumes
#   tarflow-launch torchrun eval ckpt_path=run/checkpoints/last.ckpt fid.num_samples=50000
#   NPROC=4 NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 tarflow-launch torchrun train experiment=...
#   RUN_DIR=outputs/img64_cond/2026-01-01_00-00-00 tarflow-launch torchrun train \
#       experiment=img64_cond ckpt_path=outputs/img64_cond/2026-01-01_00-00-00/checkpoints/last.ckpt
#   TRAINER=fsdp tarflow-launch torchrun train experiment=img64_cond '~callbacks.ema'   # sharded
#
# Why pin hydra.run.dir: every rank resolves ${now:...} by itself, a second apart they would
# write into different run dirs (and W&B would see different run ids). The directory is computed
# once here and passed to all ranks. (sample and eval also agree on rank 0's folder by themselves.)
#
# Training batch size: data.batch_size is PER DEVICE. The paper's global batch is
#   global = data.batch_size x NPROC x NNODES
# e.g. img128_cond (global 768): 8 GPUs x 1 node -> data.batch_size=96; 8 x 2 -> 48;
# img64_cond (480): 8 x 1 -> 60; img64_uncond / afhq256_cond (256): 8 x 1 -> 32.
# Sampling: the set does not depend on the number of ranks (member i from seed + i).
set -euo pipefail

COMMAND=train
case "${1:-}" in train|sample|eval) COMMAND="$1"; shift ;; esac
case "$COMMAND" in
  train) MODULE=tarflow.cli.train ;;
  sample) MODULE=tarflow.cli.sample ;;
  eval) MODULE=tarflow.cli.evaluate ;;
esac
if [ -z "${NPROC:-}" ]; then  # default: every visible GPU
  NPROC="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  [ "${NPROC:-0}" -ge 1 ] || NPROC=1
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
# Name the run dir after the experiment= argument (training) or the command unless TASK is given.
for arg in "$@"; do case "$arg" in experiment=*) TASK="${TASK:-${arg#experiment=}}" ;; esac; done
TASK="${TASK:-$COMMAND}"
# On several nodes set RUN_DIR yourself (same value on every node), e.g. from a job id.
RUN_DIR="${RUN_DIR:-outputs/${TASK}/$(date +%Y-%m-%d_%H-%M-%S)}"
EXTRA=()
if [ "$COMMAND" = train ]; then
  EXTRA=(trainer="${TRAINER:-ddp}" trainer.devices="${NPROC}" trainer.num_nodes="${NNODES}")
fi

echo "torchrun: ${NNODES} node(s) x ${NPROC} process(es) of tarflow ${COMMAND}; run dir ${RUN_DIR}" >&2
exec torchrun \
  --nnodes="${NNODES}" --node_rank="${NODE_RANK}" --nproc_per_node="${NPROC}" \
  --master_addr="${MASTER_ADDR}" --master_port="${MASTER_PORT}" \
  -m "${MODULE}" \
  ${EXTRA[@]+"${EXTRA[@]}"} \
  hydra.run.dir="${RUN_DIR}" \
  "$@"
