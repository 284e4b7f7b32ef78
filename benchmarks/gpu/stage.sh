#!/usr/bin/env bash
# Device call 1 of 2 (see README.md here): install Interlock's missing wheels and build
# llama-cpp-python with CUDA into /tmp/site; park the model's first half in /tmp.
# Carry: .carry/whl .carry/llama_cpp_python-0.3.36-trimmed.tar.gz .carry/ma
set -euo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 --version
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl
cp .carry/ma/part_00 /tmp/model.part_00
mkdir -p /tmp/src && tar xzf .carry/llama_cpp_python-0.3.36-trimmed.tar.gz -C /tmp/src
cd /tmp/src/llama_cpp_python-0.3.36
start=$(date +%s)
CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=16 \
  python3 -m pip install -q --no-build-isolation --no-deps --no-index --target /tmp/site . 2>&1 | tail -20
echo "llama-cpp-python CUDA build: $(( $(date +%s) - start )) s"
PYTHONPATH=/tmp/site python3 -c 'import llama_cpp, starlette, uvicorn, pydantic_settings, orjson; print("imports ok", llama_cpp.__version__)'
