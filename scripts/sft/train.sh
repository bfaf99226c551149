#!/usr/bin/env bash
# Launch SFT on one node or many with accelerate (DDP by default; DeepSpeed / FSDP via ACCELERATE_CONFIG).
#
#   NGPU=8 bash scripts/sft/train.sh --config configs/sft/klein9b_lora_r768.yaml [key=value ...]
#   NNODES=4 NODE_RANK=$RANK MASTER_ADDR=node0 NGPU=8 bash scripts/sft/train.sh --config ...
#   ACCELERATE_CONFIG=configs/accelerate/deepspeed_zero3.yaml bash scripts/sft/train.sh --config configs/sft/klein9b_full.yaml
#   DRY_RUN=1 ... bash scripts/sft/train.sh ...   # print the launch command and exit 0
#
# Multi-node: run this script once on every node with the same NNODES / MASTER_ADDR / MASTER_PORT and that
# node's NODE_RANK; each starts its own NGPU processes through torch's launcher (static rendezvous at
# MASTER_ADDR:MASTER_PORT; RDZV_BACKEND=c10d for an elastic one). The ZeRO configs set
# deepspeed_multinode_launcher: standard, so DeepSpeed also launches per node (no pdsh / hostfile).
#
# Everything after the script name is passed to SFT/train_sft.py (the --config and overrides).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

NGPU=${NGPU:-8}                       # processes (GPUs) per node
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/ddp.yaml}
PYTHON=${PYTHON:-python}
RDZV_BACKEND=${RDZV_BACKEND:-static}
DRY_RUN=${DRY_RUN:-0}
export ACCELERATE_CONFIG               # train_sft.py names it when the config cannot apply (e.g. FSDP without CUDA)

[ "$#" -gt 0 ] || { echo "usage: [NGPU=8 NNODES=1 ...] bash scripts/sft/train.sh --config configs/sft/<name>.yaml [key=value ...]" >&2; exit 2; }
[ -f "$ACCELERATE_CONFIG" ] || { echo "no accelerate config at $ACCELERATE_CONFIG" >&2; exit 2; }

# FSDP / DeepSpeed shard over CUDA GPUs; without one accelerate would quietly run plain DDP: stop instead.
backend=$(sed -n 's/^distributed_type: *//p' "$ACCELERATE_CONFIG")
if [ "$DRY_RUN" != 1 ] && { [ "$backend" = FSDP ] || [ "$backend" = DEEPSPEED ]; } &&
   ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "error: $ACCELERATE_CONFIG asks for $backend (distributed_type), which needs CUDA GPUs and this machine has none;" \
       "use ACCELERATE_CONFIG=configs/accelerate/ddp.yaml on CPU" >&2
  exit 2
fi

cmd=("$PYTHON" -m accelerate.commands.launch
     --config_file "$ACCELERATE_CONFIG"
     --num_processes $((NGPU * NNODES)) --num_machines "$NNODES" --machine_rank "$NODE_RANK"
     --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT")
if [ "$NNODES" -gt 1 ]; then
  cmd+=(--rdzv_backend "$RDZV_BACKEND")
  [ "$RDZV_BACKEND" = static ] && cmd+=(--same_network)   # static: MASTER_ADDR:MASTER_PORT; c10d: rdzv endpoint
fi
cmd+=(SFT/train_sft.py "$@")
echo "[sft/train.sh] ${cmd[*]}"
[ "$DRY_RUN" = 1 ] && exit 0
exec "${cmd[@]}"
