#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (the peer `adaspec serve` is measured against) from the llama.cpp source that the
# llama-cpp-python sdist vendors (vendor/llama.cpp): offline, no web UI, no OpenSSL. Optional (never part of setup);
# cached: a second run prints the binary's path and does nothing else.
#   bash scripts/build-llama-server.sh            # -> ~/.cache/adaspec/llama-server/<version>/llama-server
# As a user would build it (llama.cpp's defaults), except ggml's AMX kernels, which crash where a VM does not hand a
# process AMX state (as scripts/setup.sh). ADASPEC_LLAMACPP_VERSION picks the sdist (default: the one setup.sh builds).
set -euo pipefail
cd "$(dirname "$0")/.."
version="${ADASPEC_LLAMACPP_VERSION:-0.3.36}"
dest="${ADASPEC_CACHE:-$HOME/.cache/adaspec}/llama-server/$version"
if [[ -x "$dest/llama-server" ]]; then
  echo "$dest/llama-server"
  exit 0
fi
python=.venv/bin/python
[[ -x $python ]] || python=python3
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
echo "building llama-server from llama-cpp-python $version's vendored llama.cpp (several minutes on 2 cores)..." >&2
"$python" -m pip -q --disable-pip-version-check download --no-deps --no-binary :all: "llama-cpp-python==$version" \
  -d "$src" >&2
tar xzf "$src"/llama_cpp_python-*.tar.gz -C "$src"
llama=$(echo "$src"/llama_cpp_python-*/vendor/llama.cpp)
noamx=""
echo | "${CC:-cc}" -mno-amx-int8 -x c -E - >/dev/null 2>&1 && noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$llama" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DBUILD_SHARED_LIBS=OFF -DCMAKE_C_FLAGS="$noamx" -DCMAKE_CXX_FLAGS="$noamx" >&2
cmake --build "$src/build" --target llama-server -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" >&2
mkdir -p "$dest"
cp "$src/build/bin/llama-server" "$dest/llama-server.tmp"
mv "$dest/llama-server.tmp" "$dest/llama-server"
echo "$dest/llama-server"
