#!/usr/bin/env bash
# Stages what workers.py needs on a machine without a package index (Python 3.12, x86-64): this
# checkout's runtime wheels, and nginx and wrk with the libraries they link beyond glibc, under
# .carry/wk/. Run it here, copy the checkout there, then:
#   export PATH=$PWD/.carry/wk/bin:$PATH LD_LIBRARY_PATH=$PWD/.carry/wk/lib
#   python3 -m pip install --no-index --no-deps --target /tmp/site .carry/wk/whl/*.whl
#   PYTHONPATH=/tmp/site python3 benchmarks/proxy_overhead/workers.py --gateway-cpus 0,1,2,3 --load-cpus 8,9,10,11
# With a package index, `pip install -e .` and `apt-get install nginx-light wrk` are all it takes.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.carry/wk
mkdir -p "$out/bin" "$out/lib" "$out/whl"
cp "$(command -v nginx)" "$(command -v wrk)" "$out/bin/"
ldd "$out/bin/nginx" "$out/bin/wrk" | awk '$3 ~ /^\// {print $3}' | sort -u \
  | grep -v -E '/(libc|libm|libpthread|libdl|librt|libgcc_s)\.so' | xargs -I{} cp -L {} "$out/lib/"
pins=$(.venv/bin/python -m pip list --format=freeze | grep -i -E '^(starlette|uvicorn|httptools|pydantic|pydantic[-_]core|pydantic-settings|python-dotenv|annotated-types|typing[-_]inspection|orjson|tenacity|redis|hiredis|typing[-_]extensions|aiohttp|uvloop)==')
# shellcheck disable=SC2086
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$out/whl" $pins
echo "staged in $out: $(ls "$out/whl" | wc -l) wheels, $(ls "$out/lib" | wc -l) libraries"
