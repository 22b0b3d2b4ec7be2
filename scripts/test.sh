#!/usr/bin/env bash
# Install adaspec with its test tools, check for dead code (vulture, a second), then run the whole test suite (CPU,
# about 10-14 minutes on 2 cores; the limit is 15).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/vulture  # settings in pyproject.toml [tool.vulture]; false positives in .ci/vulture_whitelist.py
.venv/bin/python -m pytest -q "$@"
