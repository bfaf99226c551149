#!/usr/bin/env bash
# Launch GRPO on one node or many with torchrun (the judge runs elsewhere: scripts/rl/serve_judge.sh).
#
#   NGPU=8 bash scripts/rl/train.sh --config configs/rl/klein9b_grpo.yaml [key=value ...]
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NGPU=8 bash scripts/rl/train.sh --config ... \
#       'judge.endpoints=[http://judge-node:8000/v1,http://judge-node:8001/v1]'
#
# Everything after the script name goes to RL/train_grpo.py (the --config and overrides).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

NGPU=${NGPU:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29501}
PYTHON=${PYTHON:-python}

[ "$#" -gt 0 ] || { echo "usage: [NGPU=8 NNODES=1 ...] bash scripts/rl/train.sh --config configs/rl/<name>.yaml [key=value ...]" >&2; exit 2; }

cmd=("$PYTHON" -m torch.distributed.run --nproc_per_node "$NGPU" --nnodes "$NNODES" --node_rank "$NODE_RANK"
     --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" RL/train_grpo.py "$@")
echo "[rl/train.sh] ${cmd[*]}"
[ "${DRY_RUN:-0}" = 1 ] && exit 0   # DRY_RUN=1: print the launch command only
exec "${cmd[@]}"
