#!/usr/bin/env bash
# Serve the GRPO reward judge (Qwen3-VL-8B-Instruct by default) with vLLM: NGPU GPUs -> NGPU servers,
# one per GPU, on consecutive ports from BASE_PORT. Binds 127.0.0.1 unless HOST says otherwise, waits
# until every server answers /health (READY_TIMEOUT seconds), then prints the judge.endpoints override
# for RL training. Ctrl-C, or killing this script, stops every server it started.
#
#   NGPU=4 bash scripts/rl/serve_judge.sh &     (it blocks while serving: & or another shell)
#   -> judge.endpoints=[http://127.0.0.1:8000/v1,...,http://127.0.0.1:8003/v1] judge.model=Qwen/Qwen3-VL-8B-Instruct
#   MODEL_PATH=/models/Qwen3-VL-8B-Instruct HOST=0.0.0.0 NGPU=8 bash scripts/rl/serve_judge.sh --max-num-seqs 256
#
# HOST=0.0.0.0 (judges on other nodes than the trainer) exposes the servers: set ETCHR_JUDGE_API_KEY,
# which vLLM then requires and the RL judge client sends (judge.api_key_env); it reaches vLLM as
# $VLLM_API_KEY, never on its command line (where ps shows it) nor in the log. Extra arguments pass
# through to `vllm serve`. vllm usually lives in its own environment (it pins torch): set VLLM=path/to/vllm.
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-Qwen/Qwen3-VL-8B-Instruct}   # local folder or hub id
SERVED_MODEL_NAME=${SERVED_MODEL_NAME:-Qwen/Qwen3-VL-8B-Instruct}  # = judge.model (the RL config default)
NGPU=${NGPU:-${NUM_GPUS:-1}}          # servers, one GPU each (NUM_GPUS, launch_vllm.sh's name, works too)
FIRST_GPU=${FIRST_GPU:-0}
HOST=${HOST:-127.0.0.1}
BASE_PORT=${BASE_PORT:-8000}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-10240}  # tokens: two 720x720 images + the prompt + a 1024-token answer
GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.85}
READY_TIMEOUT=${READY_TIMEOUT:-900}   # seconds per server
LOG_DIR=${LOG_DIR:-logs/judge}
VLLM=${VLLM:-vllm}
API_KEY=${ETCHR_JUDGE_API_KEY:-}      # optional; the trainer reads the same variable

case "$MODEL_PATH" in
  /*|./*|../*) [ -f "$MODEL_PATH/config.json" ] || { echo "[serve_judge] no model at $MODEL_PATH (config.json missing)" >&2; exit 1; } ;;
esac
command -v "$VLLM" >/dev/null || { echo "[serve_judge] '$VLLM' not found: install vllm (pip install 'etchr[vllm]', usually in its own env) or set VLLM" >&2; exit 1; }
command -v curl >/dev/null || { echo "[serve_judge] curl is needed for the /health wait" >&2; exit 1; }
[ "$NGPU" -ge 1 ] || { echo "[serve_judge] NGPU must be >= 1" >&2; exit 2; }
mkdir -p "$LOG_DIR"

pids=()
cleanup() {
  trap - EXIT INT TERM
  if [ "${#pids[@]}" -gt 0 ]; then
    echo "[serve_judge] stopping ${#pids[@]} server(s)"
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The key goes through the environment: an --api-key argument would show in ps.
if [ -n "$API_KEY" ]; then export VLLM_API_KEY="$API_KEY"; fi

for i in $(seq 0 $((NGPU - 1))); do
  port=$((BASE_PORT + i))
  cmd=(env CUDA_VISIBLE_DEVICES=$((FIRST_GPU + i)) "$VLLM" serve "$MODEL_PATH" --served-model-name "$SERVED_MODEL_NAME"
       --host "$HOST" --port "$port" --max-model-len "$MAX_MODEL_LEN"
       --gpu-memory-utilization "$GPU_MEMORY_UTILIZATION" --limit-mm-per-prompt '{"image": 2}'
       "$@")
  echo "[serve_judge] ${cmd[*]}${API_KEY:+ (API key from \$ETCHR_JUDGE_API_KEY as \$VLLM_API_KEY)}"
  "${cmd[@]}" >"$LOG_DIR/judge_$port.log" 2>&1 &
  pids+=($!)
done

# A client connecting to 0.0.0.0 reaches the local server; other hosts need this node's address.
client_host=$HOST
[ "$HOST" = "0.0.0.0" ] && client_host=$(hostname)
endpoints=()
for i in $(seq 0 $((NGPU - 1))); do
  port=$((BASE_PORT + i)); start=$(date +%s)
  health_host=$HOST; [ "$HOST" = "0.0.0.0" ] && health_host=127.0.0.1
  until curl -sf -o /dev/null "http://$health_host:$port/health"; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      echo "[serve_judge] server on port $port exited; last lines of $LOG_DIR/judge_$port.log:" >&2
      tail -20 "$LOG_DIR/judge_$port.log" >&2
      exit 1
    fi
    if [ $(( $(date +%s) - start )) -gt "$READY_TIMEOUT" ]; then
      echo "[serve_judge] port $port not healthy after ${READY_TIMEOUT}s; see $LOG_DIR/judge_$port.log" >&2
      exit 1
    fi
    sleep 2
  done
  endpoints+=("http://$client_host:$port/v1")
done
echo "[serve_judge] ready: ${#endpoints[@]} judge server(s) serving '$SERVED_MODEL_NAME'"
echo "judge.endpoints=[$(IFS=,; echo "${endpoints[*]}")] judge.model=$SERVED_MODEL_NAME"
# Keep serving until interrupted or until any server dies (then the trap stops the rest).
wait -n || true
echo "[serve_judge] a server exited; stopping the others" >&2
exit 1
