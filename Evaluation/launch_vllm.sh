#!/usr/bin/env bash
# Serve the MLLM (verifier / answerer) with vLLM: N GPUs -> N servers on consecutive ports, or one
# data-parallel server (DP=1). Binds 127.0.0.1 unless HOST says otherwise; waits until every server
# answers /health; Ctrl-C (or killing this script) stops them all.
#
#   MODEL_PATH=/models/Qwen3-VL-8B-Instruct NUM_GPUS=4 bash launch_vllm.sh &
#   -> http://127.0.0.1:8000/v1 ... :8003/v1, served as "Qwen/Qwen3-VL-8B-Instruct" (the eval and RL
#      configs' default mllm.model / judge.model; the same servers can judge RL); the last lines printed:
#      mllm.endpoints=[http://127.0.0.1:8000/v1,http://127.0.0.1:8001/v1,...] mllm.model=Qwen/Qwen3-VL-8B-Instruct
# It blocks while serving: start it with & (or in another shell) and wait for /health on the last port.
# MODEL_NAME=qwen3 BASE_PORT=10000 gives the reference's name and ports. Extra vLLM flags pass through:
# bash launch_vllm.sh --max-num-seqs 128. The key ($ETCHR_MLLM_API_KEY) reaches vLLM as $VLLM_API_KEY,
# never on its command line (where ps shows it) nor in the log.
# vllm lives in its own environment on GPU nodes (README: it pins its own torch); set VLLM=path/to/vllm.
set -euo pipefail

MODEL_PATH=${MODEL_PATH:?set MODEL_PATH to the MLLM folder (e.g. Qwen3-VL-8B-Instruct)}
MODEL_NAME=${MODEL_NAME:-Qwen/Qwen3-VL-8B-Instruct}  # served name = mllm.model (the config default)
NUM_GPUS=${NUM_GPUS:-${NGPU:-1}}  # NGPU (serve_judge.sh's name) works too
FIRST_GPU=${FIRST_GPU:-0}
DP=${DP:-0}                       # 1: one server with --data-parallel-size NUM_GPUS
HOST=${HOST:-127.0.0.1}
BASE_PORT=${BASE_PORT:-8000}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-10240}
GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.8}
API_KEY=${ETCHR_MLLM_API_KEY:-}   # optional; clients read the same variable
READY_TIMEOUT=${READY_TIMEOUT:-900}
LOG_DIR=${LOG_DIR:-logs/vllm}
VLLM=${VLLM:-vllm}

[ -f "${MODEL_PATH}/config.json" ] || { echo "[launch_vllm] no model at ${MODEL_PATH} (config.json missing)" >&2; exit 1; }
command -v "$VLLM" >/dev/null || { echo "[launch_vllm] '$VLLM' not found: install vllm (ETCHR_EXTRAS=vllm) or set VLLM" >&2; exit 1; }
mkdir -p "$LOG_DIR"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

# The key goes through the environment: an --api-key argument would show in ps.
if [ -n "$API_KEY" ]; then export VLLM_API_KEY="$API_KEY"; fi

if [ "$DP" = "1" ]; then servers=1; else servers=$NUM_GPUS; fi
for i in $(seq 0 $((servers - 1))); do
  port=$((BASE_PORT + i))
  if [ "$DP" = "1" ]; then
    gpus=$(seq -s, "$FIRST_GPU" $((FIRST_GPU + NUM_GPUS - 1))); extra=(--data-parallel-size "$NUM_GPUS")
  else
    gpus=$((FIRST_GPU + i)); extra=()
  fi
  cmd=(env CUDA_VISIBLE_DEVICES="$gpus" "$VLLM" serve "$MODEL_PATH" --served-model-name "$MODEL_NAME"
       --host "$HOST" --port "$port" --max-model-len "$MAX_MODEL_LEN"
       --gpu-memory-utilization "$GPU_MEMORY_UTILIZATION" ${extra[@]+"${extra[@]}"} "$@")
  echo "[launch_vllm] ${cmd[*]}${API_KEY:+ (API key from \$ETCHR_MLLM_API_KEY as \$VLLM_API_KEY)}"
  "${cmd[@]}" >"$LOG_DIR/vllm_$port.log" 2>&1 &
  pids+=($!)
done

endpoints=()
for i in $(seq 0 $((servers - 1))); do
  port=$((BASE_PORT + i)); start=$(date +%s)
  until curl -sf "http://$HOST:$port/health" >/dev/null; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      echo "[launch_vllm] server on port $port exited; see $LOG_DIR/vllm_$port.log" >&2; tail -20 "$LOG_DIR/vllm_$port.log" >&2; exit 1
    fi
    if [ $(( $(date +%s) - start )) -gt "$READY_TIMEOUT" ]; then
      echo "[launch_vllm] port $port not healthy after ${READY_TIMEOUT}s; see $LOG_DIR/vllm_$port.log" >&2; exit 1
    fi
    sleep 5
  done
  endpoints+=("http://$HOST:$port/v1")
done
echo "[launch_vllm] ready: model '$MODEL_NAME' at: ${endpoints[*]}"
echo "[launch_vllm] eval config: mllm.endpoints=[$(IFS=,; echo "${endpoints[*]}")] mllm.model=$MODEL_NAME"
wait
