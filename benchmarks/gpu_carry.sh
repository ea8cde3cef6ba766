#!/usr/bin/env bash
# The GPU checks on a bare, offline GPU box that has Python, torch with CUDA and little else (the device
# machine of these sessions: Python 3.12, torch 2.11 + CUDA 13; its files arrive as a copy of the working
# tree plus at most 64 MiB of carried ignored paths, see ../shared/STACK-NOTES.md).
#
#   benchmarks/gpu_carry.sh prepare                 # here, with network to the package index: .whl/ (py3.12
#                                                   # wheels of what the box lacks, at constraints.txt's pins)
#                                                   # and .opsd/bench (gpu.sh --prepare: problems, model shapes)
#   benchmarks/gpu_carry.sh run [gpu.sh options]    # there: install the wheels into a temporary folder, run
#                                                   # benchmarks/gpu.sh, copy its reports to $OUT (if set)
#
# With the `run` tool: carry [".whl", ".opsd/bench"], command `bash benchmarks/gpu_carry.sh run` (part 1),
# then `bash benchmarks/gpu_carry.sh run --part 2`.
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
    du -sh .whl .opsd/bench
    ;;
  run)
    shift
    site="$(mktemp -d)/site"
    python3 -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHON=python3
    status=0
    bash benchmarks/gpu.sh "$@" || status=$?
    if [[ -n "${OUT:-}" ]]; then
      find benchmarks/results -newer "$site" -type f -exec cp {} "$OUT"/ \;
    fi
    exit "$status"
    ;;
  *)
    echo "usage: benchmarks/gpu_carry.sh prepare | run [gpu.sh options]" >&2
    exit 2
    ;;
esac
