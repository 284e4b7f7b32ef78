#!/usr/bin/env bash
# Builds llama.cpp's own C++ `llama-server` from the llama.cpp source vendored in the
# llama-cpp-python sdist that .venv uses, so the baseline runs the very same ggml kernels as
# Interlock's in-process backend: any difference bench.py measures is the serving layer.
#
#   flock /tmp/interlock-bench.lock benchmarks/llamacpp_batching/build_llama_server.sh
#
# (The machine is shared and has two cores: a compile running next to someone's timing run
# skews it, hence the lock. The script does not take it itself, so that running it under
# flock as above cannot deadlock against its own lock.)
#
# Idempotent: does nothing when the binary exists. Output: benchmarks/.work/llama-server/
# (gitignored); the binary is build/bin/llama-server there, which bench.py looks for.
set -euo pipefail
cd "$(dirname "$0")/../.."

version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
work=benchmarks/.work/llama-server
bin=$work/build/bin/llama-server
python=${PYTHON:-.venv/bin/python}

if [ -x "$bin" ]; then
  echo "build_llama_server: $bin already built" >&2
  echo "$bin"
  exit 0
fi

mkdir -p "$work/dl" "$work/src"
sdist=$work/dl/llama_cpp_python-$version.tar.gz
if [ ! -f "$sdist" ]; then
  # --no-binary: the sdist is what carries vendor/llama.cpp; pip builds the wheel from it too.
  "$python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work/dl"
fi
src=$work/src/llama_cpp_python-$version/vendor/llama.cpp
if [ ! -f "$src/CMakeLists.txt" ]; then
  tar -xzf "$sdist" -C "$work/src"
fi

# Flags, and why:
#   GGML_NATIVE=OFF + AVX/AVX2/FMA/F16C: the same portable build scripts/setup gives
#     llama-cpp-python; -march=native segfaults in the AMX kernels on this CPU.
#   LLAMA_CURL=OFF: no model downloads (deprecated in this llama.cpp, kept for older trees).
#   LLAMA_BUILD_UI=OFF, LLAMA_USE_PREBUILT_UI=OFF: the server embeds its web UI either from an
#     npm build or from a download off a Hugging Face bucket at build time; with both off
#     scripts/ui-assets.cmake embeds an empty asset table and the build stays offline.
#   LLAMA_OPENSSL=OFF: HTTPS is not needed on loopback and the dev headers may be missing.
#   BUILD_SHARED_LIBS=OFF: one self-contained binary, no rpath to get right.
#   tests/examples off: fewer targets to configure; only llama-server is built anyway.
cmake -S "$src" -B "$work/build" \
  -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
cmake --build "$work/build" --target llama-server -j2

test -x "$bin"
echo "$bin"
