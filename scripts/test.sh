#!/usr/bin/env bash
# Install adaspec with its test tools, then run the whole test suite (CPU, under 10 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/python -m pytest -q "$@"
