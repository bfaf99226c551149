#!/usr/bin/env bash
# Run single-GPU benchmarks side by side, one lane per GPU, under one deadline.
#
#   RESULTS=bench_results DEADLINE_S=3600 bash scripts/bench/run_all.sh sft,edit rl
#
# Each argument is a lane: a comma list of benchmarks run one after the other on its own GPU (lane i
# gets CUDA_VISIBLE_DEVICES=i). Benchmarks: sft (bench_sft_step.py), rl (bench_rl_group.py), edit
# (bench_edit.py), e2e (bench_eval_e2e.py); extra flags per benchmark via SFT_ARGS, RL_ARGS,
# EDIT_ARGS, E2E_ARGS. Results: $RESULTS/<bench>.jsonl (one JSON object per line, as printed) and
# $RESULTS/<bench>.log. A benchmark still running at the deadline is stopped; the lines it has
# written stay. Ratios are only comparable within one benchmark (same card, same process).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

RESULTS=${RESULTS:-bench_results}
DEADLINE_S=${DEADLINE_S:-3600}
PYTHON=${PYTHON:-python3}
[ "$#" -gt 0 ] || { echo "usage: bash scripts/bench/run_all.sh LANE [LANE ...]   (LANE = comma list of sft,rl,edit,e2e)" >&2; exit 2; }
mkdir -p "$RESULTS"
start=$(date +%s)

script_of() {
  case "$1" in
    sft) echo "scripts/bench/bench_sft_step.py ${SFT_ARGS:-}" ;;
    rl) echo "scripts/bench/bench_rl_group.py ${RL_ARGS:-}" ;;
    edit) echo "scripts/bench/bench_edit.py ${EDIT_ARGS:-}" ;;
    e2e) echo "scripts/bench/bench_eval_e2e.py ${E2E_ARGS:-}" ;;
    *) return 1 ;;
  esac
}

for lane in "$@"; do
  for b in ${lane//,/ }; do
    script_of "$b" >/dev/null || { echo "unknown benchmark '$b' (use sft, rl, edit, e2e)" >&2; exit 2; }
  done
done

run_lane() {  # $1 = GPU index, $2 = comma list
  local gpu=$1 b left
  for b in ${2//,/ }; do
    left=$(( DEADLINE_S - ($(date +%s) - start) ))
    if [ "$left" -le 10 ]; then
      echo "{\"bench\": \"$b\", \"error\": \"not started: deadline reached\"}" >> "$RESULTS/$b.jsonl"
      continue
    fi
    echo "[run_all] GPU $gpu: $b ($left s left)"
    # shellcheck disable=SC2046
    CUDA_VISIBLE_DEVICES=$gpu PYTHONUNBUFFERED=1 timeout --signal=TERM --kill-after=10 "$left" \
      "$PYTHON" $(script_of "$b") --out "$RESULTS/$b.jsonl" > "$RESULTS/$b.log" 2>&1
    local rc=$?
    [ "$rc" -eq 0 ] || echo "{\"bench\": \"$b\", \"error\": \"exit status $rc (124 = deadline)\"}" >> "$RESULTS/$b.jsonl"
    echo "[run_all] GPU $gpu: $b done (exit $rc, $(( $(date +%s) - start )) s)"
  done
}

i=0
for lane in "$@"; do
  run_lane "$i" "$lane" &
  i=$((i + 1))
done
wait
echo "[run_all] all lanes done in $(( $(date +%s) - start )) s; results in $RESULTS"
