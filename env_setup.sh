#!/usr/bin/env bash
# One-command install: creates .venv (or $VENV) and installs everything the demo and the tests need.
#   bash env_setup.sh                 # CPU/dev machine: torch 2.14.1 + all deps + dev/deepspeed extras
#   TORCH_SPEC="torch==2.8.0 torchvision==0.23.0" TORCH_INDEX_URL=<your CUDA wheel index> bash env_setup.sh
#   ETCHR_EXTRAS="dev,deepspeed,vllm" bash env_setup.sh   # GPU node (vllm pins its own torch: see README)
# Idempotent: rerunning reuses the venv and only installs what is missing. Fails loudly (set -e).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
ETCHR_EXTRAS=${ETCHR_EXTRAS:-"dev,deepspeed"}

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), f"Python >= 3.10 needed, found {sys.version}"'

if [ ! -x "$VENV/bin/python" ]; then
  echo "[env_setup] creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip setuptools wheel

echo "[env_setup] torch: $TORCH_SPEC"
# shellcheck disable=SC2086
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "$PY" -m pip install --quiet $TORCH_SPEC --index-url "$TORCH_INDEX_URL"
else
  "$PY" -m pip install --quiet $TORCH_SPEC
fi

# DeepSpeed builds no CUDA ops at install time here (JIT on GPU nodes); needed to install on CPU.
export DS_BUILD_OPS=${DS_BUILD_OPS:-0}
echo "[env_setup] project (editable) with extras [$ETCHR_EXTRAS]"
"$PY" -m pip install --quiet -e ".[${ETCHR_EXTRAS}]"

"$PY" - <<'PY'
import importlib, sys
mods = ["torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "datasets",
        "openai", "omegaconf", "etchr_sft", "etchr_rl", "etchr_eval"]
for m in mods:
    importlib.import_module(m)
from diffusers import Flux2KleinPipeline  # noqa: F401  (needs diffusers >= 0.42)
import torch, transformers, diffusers
print(f"[env_setup] ok: python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, diffusers {diffusers.__version__}")
PY
echo "[env_setup] done. Activate with: source $VENV/bin/activate"
