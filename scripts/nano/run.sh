#!/usr/bin/env bash
# The nano recipe (docs/NANO.md): a small FLUX.2-klein-architecture editor trained FROM SCRATCH on procedural
# mazes through the real entry points, SFT/train_sft.py (full fine-tuning) then RL/train_grpo.py (judge-free
# rule rewards), with its own edits of held-out mazes scored after each stage. A one-GPU benchmark, not a test;
# --tiny (or NANO_TINY=1) runs the whole chain on CPU with minuscule settings (tests/test_nano.py).
#
#   bash scripts/nano/run.sh                      # one GPU, NANO_BUDGET_MIN=20 minutes for everything
#   bash scripts/nano/run.sh --tiny               # CPU smoke run (< 90 s), OUT_DIR=runs/nano_tiny
#   PYTHON=python3 PYTHONPATH=/tmp/site OUT_DIR=/tmp/nano bash scripts/nano/run.sh
#
# Stages (each echoed, timed into $OUT_DIR/stage_times.tsv): prepare (data: train / held-out split by seed;
# model: random DiT + small text encoder, a VAE trained on the training images, BatchNorm-calibrated) -> sft
# (train_sft.py, time-boxed) -> eval_sft (assemble the checkpoint, edit + rule-score the held-out items) -> rl
# (train_grpo.py, time-boxed) -> eval_rl (RL/merge_lora.py, then the same scoring); then results.json and
# one summary line. Each stage is one process (interpreter starts cost seconds: data + model share one).
#
# Knobs (environment; GPU defaults, tiny defaults in --tiny mode):
#   OUT_DIR           runs/nano                output folder; must not hold an earlier run
#   PYTHON            python                   interpreter (no .venv is assumed)
#   NANO_BUDGET_MIN   20                       total wall-time budget; SFT and RL time limits derive from it
#   SFT_TIME_S        auto                     SFT training-loop cap (s); auto = what is left of the budget
#                                              after prepare, minus RL_TIME_S and RESERVE_S (180 s: SFT start
#                                              and exit, both evals, RL start); a number is clamped likewise
#   RL_TIME_S         budget / 5               RL training-loop cap (s), clamped to keep RESERVE_RL_S (75 s)
#   VAE_TIME_S        90                       VAE training cap (s)
#   SFT_STEPS / RL_STEPS   100000 / 1000       step caps (whichever of steps and time comes first)
#   SFT_BATCH 128  SFT_LR 3e-4  SFT_WORKERS 8  SFT_COMPILE false
#   RL_PROMPTS 16 (prompts per iteration; G = RL_GROUP 8)  RL_SAMPLING_STEPS 8  RL_LR 1e-4
#   N_TRAIN 60000  N_HELDOUT 200  N_RL 4000  MAZE_SIZES 5,6,7,8  SEED 0
#   NANO_FAMILIES     maze                     maze | maze,jigsaw (N_JIGSAW_TRAIN 5000, N_JIGSAW_HELDOUT 100)
#   EVAL_STEPS 8  EVAL_ITEMS 0 (= all)  NANO_HIDDEN / NANO_HEADS / NANO_DOUBLE / NANO_SINGLE (0 = preset)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

for arg in "$@"; do
  case "$arg" in
    --tiny) NANO_TINY=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown argument '$arg' (use --tiny, or environment knobs; see --help)" >&2; exit 2 ;;
  esac
done
NANO_TINY=${NANO_TINY:-0}
PYTHON=${PYTHON:-python}
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline} TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error}
export TOKENIZERS_PARALLELISM=false

if [ "$NANO_TINY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""  # CPU, even on a GPU machine
  # One thread: minuscule matmuls gain nothing from more, and on a busy machine OpenMP's spinning
  # threads made a tiny text-encoder call ~100x slower.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
  OUT_DIR=${OUT_DIR:-runs/nano_tiny}
  NANO_BUDGET_MIN=${NANO_BUDGET_MIN:-5}
  : "${N_TRAIN:=12}" "${N_HELDOUT:=3}" "${N_RL:=4}" "${MAZE_SIZES:=4,5}" "${N_JIGSAW_TRAIN:=2}" "${N_JIGSAW_HELDOUT:=1}"
  : "${VAE_TIME_S:=0}" "${VAE_STEPS:=3}" "${VAE_BATCH:=4}"
  : "${SFT_STEPS:=2}" "${SFT_BATCH:=2}" "${SFT_WORKERS:=0}" "${SFT_TIME_S:=60}"
  : "${RL_STEPS:=1}" "${RL_PROMPTS:=1}" "${RL_GROUP:=2}" "${RL_SAMPLING_STEPS:=3}" "${RL_TIME_S:=60}"
  : "${EVAL_STEPS:=2}" "${RESERVE_S:=0}" "${RESERVE_RL_S:=0}"
  MODEL_FLAGS=(--tiny)
  SFT_EXTRA=('train.mixed_precision="no"' train.log_every=1 data.num_workers="$SFT_WORKERS" optim.warmup_steps=0)
else
  OUT_DIR=${OUT_DIR:-runs/nano}
  NANO_BUDGET_MIN=${NANO_BUDGET_MIN:-20}
  MODEL_FLAGS=()
  SFT_EXTRA=(data.num_workers="${SFT_WORKERS:-8}" model.compile="${SFT_COMPILE:-false}")
fi
BUDGET_S=$(awk "BEGIN{printf \"%d\", ${NANO_BUDGET_MIN} * 60}")
SFT_TIME_S=${SFT_TIME_S:-auto}
RL_TIME_S=${RL_TIME_S:-$((BUDGET_S / 5))}
VAE_TIME_S=${VAE_TIME_S:-90}
VAE_STEPS=${VAE_STEPS:-3000}
VAE_BATCH=${VAE_BATCH:-32}
RESERVE_S=${RESERVE_S:-180}
RESERVE_RL_S=${RESERVE_RL_S:-75}
SFT_STEPS=${SFT_STEPS:-100000}
SFT_BATCH=${SFT_BATCH:-128}
SFT_LR=${SFT_LR:-3e-4}
RL_STEPS=${RL_STEPS:-1000}
RL_PROMPTS=${RL_PROMPTS:-16}
RL_GROUP=${RL_GROUP:-8}
RL_SAMPLING_STEPS=${RL_SAMPLING_STEPS:-8}
RL_LR=${RL_LR:-1e-4}
N_TRAIN=${N_TRAIN:-60000}
N_HELDOUT=${N_HELDOUT:-200}
N_RL=${N_RL:-4000}
MAZE_SIZES=${MAZE_SIZES:-5,6,7,8}
SEED=${SEED:-0}
NANO_FAMILIES=${NANO_FAMILIES:-maze}
EVAL_STEPS=${EVAL_STEPS:-8}
EVAL_ITEMS=${EVAL_ITEMS:-0}

case ",$NANO_FAMILIES," in
  *,jigsaw,*) N_JIGSAW_TRAIN=${N_JIGSAW_TRAIN:-5000}; N_JIGSAW_HELDOUT=${N_JIGSAW_HELDOUT:-100}
              RL_REWARD_EXTRA=(reward.weights.jigsaw_restore=1.0) ;;
  *) N_JIGSAW_TRAIN=0; N_JIGSAW_HELDOUT=0; RL_REWARD_EXTRA=() ;;
esac
for fam in ${NANO_FAMILIES//,/ }; do
  case "$fam" in
    maze|jigsaw) ;;
    *) echo "NANO_FAMILIES: unknown family '$fam' (use maze or maze,jigsaw)" >&2; exit 2 ;;
  esac
done

if [ -e "$OUT_DIR/stage_times.tsv" ]; then
  echo "error: $OUT_DIR holds an earlier nano run (stage_times.tsv); choose another OUT_DIR or remove it" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/stage_times.tsv"
# RL's micro-batch = one group's trained transitions: G x int((S - 1) x 0.6).
RL_MICRO=$((RL_GROUP * ((RL_SAMPLING_STEPS - 1) * 6 / 10 > 0 ? (RL_SAMPLING_STEPS - 1) * 6 / 10 : 1)))

stage() {  # stage NAME CMD ...: echo the command, run it, append "NAME<TAB>seconds" to stage_times.tsv
  local name=$1 t0 t1
  shift
  echo "+ $*"
  t0=$(date +%s.%N)
  "$@"
  t1=$(date +%s.%N)
  printf '%s\t%s\n' "$name" "$(awk "BEGIN{printf \"%.2f\", $t1 - $t0}")" >> "$OUT_DIR/stage_times.tsv"
}
clamp() {  # clamp WANTED RESERVE: min(WANTED, budget left - RESERVE), at least 10 s; auto = budget left - RESERVE
  local left=$((BUDGET_S - SECONDS - $2))
  left=$((left > 10 ? left : 10))
  if [ "$1" = auto ]; then echo "$left"; elif [ "$1" = 0 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"
  else echo "$1"; fi
}
latest() { echo "$1/checkpoints/$(cat "$1/checkpoints/latest")"; }

echo "[nano] OUT_DIR=$OUT_DIR budget ${BUDGET_S}s tiny=$NANO_TINY families=$NANO_FAMILIES sizes=$MAZE_SIZES"
SECONDS=0
stage prepare "$PYTHON" scripts/nano/nano.py prepare --out-dir "$OUT_DIR" --seed "$SEED" "${MODEL_FLAGS[@]}" \
  --n-train "$N_TRAIN" --n-heldout "$N_HELDOUT" --n-rl "$N_RL" --sizes "$MAZE_SIZES" \
  --n-jigsaw-train "$N_JIGSAW_TRAIN" --n-jigsaw-heldout "$N_JIGSAW_HELDOUT" --vae-steps "$VAE_STEPS" \
  --vae-time-s "$VAE_TIME_S" --vae-batch "$VAE_BATCH" --hidden "${NANO_HIDDEN:-0}" --heads "${NANO_HEADS:-0}" \
  --double-blocks "${NANO_DOUBLE:-0}" --single-blocks "${NANO_SINGLE:-0}"

SFT_LIMIT=$(clamp "$SFT_TIME_S" $((RL_TIME_S + RESERVE_S)))
stage sft "$PYTHON" SFT/train_sft.py --config configs/sft/nano_maze.yaml \
  model.pretrained_path="$OUT_DIR/model/flux2-klein-nano" data.csv="$OUT_DIR/data/train/sft.csv" \
  train.run_dir="$OUT_DIR/sft" train.max_steps="$SFT_STEPS" train.batch_size="$SFT_BATCH" optim.lr="$SFT_LR" \
  train.time_limit_s="$SFT_LIMIT" train.seed="$SEED" "${SFT_EXTRA[@]}"
stage eval_sft "$PYTHON" scripts/nano/nano.py eval --out-dir "$OUT_DIR" --stage sft \
  --sft-checkpoint "$(latest "$OUT_DIR/sft")" --steps "$EVAL_STEPS" --limit "$EVAL_ITEMS"

RL_LIMIT=$(clamp "$RL_TIME_S" "$RESERVE_RL_S")
stage rl "$PYTHON" RL/train_grpo.py --config configs/rl/nano_maze.yaml \
  model.pretrained_path="$OUT_DIR/sft_pipeline" data.jsonl="$OUT_DIR/data/train/grpo.jsonl" \
  train.run_dir="$OUT_DIR/rl" train.max_steps="$RL_STEPS" train.prompts_per_step="$RL_PROMPTS" \
  sampling.group_size="$RL_GROUP" sampling.steps="$RL_SAMPLING_STEPS" train.grad_accum=$((RL_PROMPTS * RL_GROUP)) \
  train.micro_batch="$RL_MICRO" optim.lr="$RL_LR" train.time_limit_s="$RL_LIMIT" train.seed="$SEED" \
  "${RL_REWARD_EXTRA[@]}"
stage eval_rl "$PYTHON" scripts/nano/nano.py eval --out-dir "$OUT_DIR" --stage rl \
  --rl-checkpoint "$(latest "$OUT_DIR/rl")" --steps "$EVAL_STEPS" --limit "$EVAL_ITEMS"

if [ "$NANO_TINY" = 1 ]; then TINY_JSON=true; else TINY_JSON=false; fi
KNOBS="{\"tiny\": $TINY_JSON, \"families\": \"$NANO_FAMILIES\", \"maze_sizes\": \"$MAZE_SIZES\", \"seed\": $SEED"
KNOBS+=", \"n_train\": $N_TRAIN, \"n_heldout\": $N_HELDOUT, \"sft_time_limit_s\": $SFT_LIMIT"
KNOBS+=", \"sft_steps_cap\": $SFT_STEPS, \"sft_batch\": $SFT_BATCH, \"sft_lr\": \"$SFT_LR\""
KNOBS+=", \"rl_time_limit_s\": $RL_LIMIT, \"rl_steps_cap\": $RL_STEPS, \"rl_prompts\": $RL_PROMPTS"
KNOBS+=", \"rl_group\": $RL_GROUP, \"rl_sampling_steps\": $RL_SAMPLING_STEPS, \"rl_lr\": \"$RL_LR\""
KNOBS+=", \"eval_steps\": $EVAL_STEPS}"
"$PYTHON" scripts/nano/nano.py report --out-dir "$OUT_DIR" --budget-min "$NANO_BUDGET_MIN" --knobs "$KNOBS"
