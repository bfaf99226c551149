#!/usr/bin/env bash
# One node of scripts/slurm/eval.sbatch (run there by srun, one task per node; not meant to be run by hand).
# GPUs 0 .. MLLM_GPUS-1 serve the MLLM through Evaluation/launch_vllm.sh on 127.0.0.1:BASE_PORT.. (this
# node's editor ranks are its only clients, so nothing listens beyond the node); GPUs MLLM_GPUS .. NGPU-1
# run this node's NGPU - MLLM_GPUS ranks of the one torchrun job over all nodes.
# From eval.sbatch: NNODES MASTER_ADDR MASTER_PORT NGPU MLLM_GPUS DRY_RUN; from srun: SLURM_NODEID.
set -euo pipefail
[ -n "${SLURM_NODEID:-}" ] || { echo "[slurm/eval_node] SLURM_NODEID unset: this runs under srun from scripts/slurm/eval.sbatch" >&2; exit 2; }
# shellcheck source=scripts/slurm/common.sh
source scripts/slurm/common.sh

NODE_RANK=$SLURM_NODEID
BASE_PORT=${BASE_PORT:-8000}
READY_TIMEOUT=${READY_TIMEOUT:-1800}   # seconds until every local server answers /health
PYTHON=${PYTHON:-python}
tag="slurm/eval node $NODE_RANK"
EDIT_GPUS=$((NGPU - MLLM_GPUS))
edit_devices=$(seq -s, "$MLLM_GPUS" $((NGPU - 1)))

overrides=()
vllm_pid=
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  if [ -n "$vllm_pid" ] && kill -0 "$vllm_pid" 2>/dev/null; then
    kill "$vllm_pid" 2>/dev/null || true   # launch_vllm.sh's trap stops its servers
    wait "$vllm_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

if [ "$MLLM_GPUS" -gt 0 ]; then
  endpoints=()
  for ((i = 0; i < MLLM_GPUS; i++)); do endpoints+=("http://127.0.0.1:$((BASE_PORT + i))/v1"); done
  # Appended after the user's arguments, so these URLs win over an mllm.endpoints given there.
  overrides=("mllm.endpoints=[$(IFS=,; echo "${endpoints[*]}")]")
  serve=(env NUM_GPUS="$MLLM_GPUS" FIRST_GPU=0 HOST=127.0.0.1 BASE_PORT="$BASE_PORT"
         LOG_DIR="logs/vllm-${SLURM_JOB_ID:-job}-node$NODE_RANK" bash Evaluation/launch_vllm.sh)
  show "$tag" "${serve[@]}"
  if [ "$DRY_RUN" != 1 ]; then
    "${serve[@]}" &
    vllm_pid=$!
    start=$SECONDS
    for url in "${endpoints[@]}"; do
      until curl -sf -o /dev/null "${url%/v1}/health"; do
        kill -0 "$vllm_pid" 2>/dev/null || die "node $NODE_RANK: launch_vllm.sh exited before ${url%/v1} answered"
        [ $((SECONDS - start)) -le "$READY_TIMEOUT" ] || die "node $NODE_RANK: ${url%/v1}/health silent after ${READY_TIMEOUT}s"
        sleep 2
      done
    done
  fi
fi

run=(env CUDA_VISIBLE_DEVICES="$edit_devices" "$PYTHON" -m torch.distributed.run
     --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$EDIT_GPUS"
     --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     Evaluation/evaluate.py "$@" ${overrides[@]+"${overrides[@]}"})
show "$tag" "${run[@]}"
[ "$DRY_RUN" = 1 ] && exit 0
rc=0
"${run[@]}" || rc=$?
exit "$rc"
