#!/usr/bin/env bash
# Launch SFT on one node or many with accelerate (DDP by default; DeepSpeed / FSDP via ACCELERATE_CONFIG).
#
#   NGPU=8 bash scripts/sft/train.sh --config configs/sft/klein9b_lora_r768.yaml [key=value ...]
#   NNODES=4 NODE_RANK=$RANK MASTER_ADDR=node0 NGPU=8 bash scripts/sft/train.sh --config ...
#   ACCELERATE_CONFIG=configs/accelerate/deepspeed_zero3.yaml bash scripts/sft/train.sh --config configs/sft/klein9b_full.yaml
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

[ "$#" -gt 0 ] || { echo "usage: [NGPU=8 NNODES=1 ...] bash scripts/sft/train.sh --config configs/sft/<name>.yaml [key=value ...]" >&2; exit 2; }
[ -f "$ACCELERATE_CONFIG" ] || { echo "no accelerate config at $ACCELERATE_CONFIG" >&2; exit 2; }

cmd=("$PYTHON" -m accelerate.commands.launch
     --config_file "$ACCELERATE_CONFIG"
     --num_processes $((NGPU * NNODES)) --num_machines "$NNODES" --machine_rank "$NODE_RANK"
     --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
     SFT/train_sft.py "$@")
echo "[sft/train.sh] ${cmd[*]}"
exec "${cmd[@]}"
