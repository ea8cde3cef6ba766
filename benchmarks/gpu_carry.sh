#!/usr/bin/env bash
# The GPU checks on a bare, offline GPU box that has Python, torch with CUDA and little else (the device
# machine of these sessions: Python 3.12, torch 2.11 + CUDA 13; its files arrive as a copy of the working
# tree plus at most 64 MiB of carried ignored paths, see ../shared/STACK-NOTES.md).
#
#   benchmarks/gpu_carry.sh prepare                 # here, with network to the package index: .whl/ (py3.12
#                                                   # wheels of what the box lacks, at constraints.txt's pins)
#                                                   # and .opsd/bench (gpu.sh --prepare: problems, model shapes)
#   benchmarks/gpu_carry.sh run [gpu.sh options]    # there: install the wheels into a temporary folder, run
#                                                   # benchmarks/gpu.sh, which copies its reports to $OUT (if set)
#
# With the `run` tool (the device plan in benchmarks/README.md): carry [".whl", ".opsd/bench"], command
# `bash benchmarks/gpu_carry.sh run --part all`, timeout_s 600: both parts in one command of under 9.7 minutes,
# since a 15-minute lease holds the machine's start and one such command. `prepare` prints what travels
# (the working tree and both carried folders) against the 64 MiB limit.
set -euo pipefail
cd "$(dirname "$0")/.."

# what the box lacked on 2026-11-27 (torch, numpy, safetensors, pyyaml, tqdm, ... were there)
WHEELS="trl datasets dill multiprocess pydantic pydantic_core annotated-types typing-inspection typing_extensions
transformers huggingface_hub httpx httpcore h11 anyio sniffio certifi idna truststore peft hf-xet click typer
shellingham rich fsspec tokenizers accelerate psutil xxhash gguf"

case "${1:-}" in
  prepare)
    rm -rf .whl && mkdir -p .whl
    for name in $WHEELS; do
      pin=$(grep -i -E "^${name//[-_]/[-_]}==" constraints.txt || true)
      pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "${pin:-$name}"
    done
    bash benchmarks/gpu.sh --prepare
    # what the run tool sends: the working tree (tracked and untracked, not ignored) and the carried folders;
    # nothing may be materialized under .opsd/bench (gpu.sh writes weights into .opsd/models/shapes)
    tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
    whl=$(du -sb .whl | cut -f1)
    bench=$(du -sb .opsd/bench | cut -f1)
    total=$((tree + whl + bench))
    awk -v t="$tree" -v w="$whl" -v b="$bench" 'BEGIN { m = 1048576; printf "gpu_carry.sh: travels %.1f MiB of 64 (working tree %.1f, .whl %.1f, .opsd/bench %.1f)\n", (t + w + b) / m, t / m, w / m, b / m }'
    if ((total > 64 * 1048576)); then echo "gpu_carry.sh: over the 64 MiB limit" >&2; exit 1; fi
    ;;
  run)
    shift
    site="$(mktemp -d)/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHON=python3 PYTHONUNBUFFERED=1
    exec bash benchmarks/gpu.sh "$@"
    ;;
  *)
    echo "usage: benchmarks/gpu_carry.sh prepare | run [gpu.sh options]" >&2
    exit 2
    ;;
esac
