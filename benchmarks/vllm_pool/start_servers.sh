#!/usr/bin/env bash
# Device: two vLLM 0.26.0 servers with Llama-3-8B's shape and random weights on :8001 and :8002,
# for bench.py and sdk_checks.py. Run from the repo root after the recipe's install.sh
# (see README.md here; normally `pip install vllm==0.26.0`) has put vLLM in /tmp/site and SmolLM2 in /tmp/smollm2-hf.
#
# Each server runs in its own session (setsid) so that it outlives the call that started it;
# its pid (= its process group, which holds vLLM's engine core too) goes to /tmp/vN.pid, its log
# to /tmp/vN.log. They start one after the other, as the recipe says: a second vLLM profiling
# GPU memory while the first still allocates would misjudge what is free. A server that already
# answers /health is left alone and one still starting (its pid alive) is waited for, so the
# script can be re-run after a call that ran out of time.
#
# Prefix caching is on by default in vLLM's V1 engine (the captured /metrics page of a server
# started without the flag shows vllm:cache_config_info{enable_prefix_caching="True"} and the
# vllm:prefix_cache_* counters); --enable-prefix-caching says so explicitly, and the check at the
# end reads it back from each server.
set -euo pipefail
export PYTHONUNBUFFERED=1
SITE=${SITE:-/tmp/site}
HF=${SMOLLM2:-/tmp/smollm2-hf}
MODEL=${MODEL_DIR:-/tmp/llama8b-dummy}
TIMEOUT=${TIMEOUT:-270}  # seconds per server until /health answers; two of them fit a 10-minute call
T0=$(date +%s)

test -f "$HF/tokenizer.json" || { echo "no $HF/tokenizer.json: run the recipe's install.sh first" >&2; exit 1; }
mkdir -p "$MODEL"
# Llama-3-8B's shape with SmolLM2's vocabulary (the recipe's config): real compute, gibberish text
cat > "$MODEL/config.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
 "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
 "num_key_value_heads": 8, "vocab_size": 49152, "max_position_embeddings": 8192,
 "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
 "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}
JSON
for f in tokenizer.json tokenizer_config.json chat_template.jinja generation_config.json special_tokens_map.json; do
  if [ -f "$HF/$f" ]; then cp "$HF/$f" "$MODEL/"; fi
done
echo "model folder $MODEL: $(ls "$MODEL" | tr '\n' ' ')"

healthy() {  # 0 when GET /health answers 200
  python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "http://127.0.0.1:$1/health" >/dev/null 2>&1
}

start() {  # start N PORT: one server, waited for
  local n=$1 port=$2 log=/tmp/v$1.log pidf=/tmp/v$1.pid t
  if healthy "$port"; then echo "server $n (:$port) already healthy, pid $(cat "$pidf" 2>/dev/null || echo ?)"; return; fi
  t=$(date +%s)
  local pid
  if [ -s "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; then
    # still starting from an earlier call that ran out of time: wait for it, never start a second one
    pid=$(cat "$pidf"); echo "server $n: pid $pid is still starting; waiting for it"
  else
    rm -f "$pidf"
    # bash writes its own pid and execs vLLM in place: the pid in the file is the session leader,
    # whether or not setsid had to fork
    PYTHONPATH=$SITE VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 setsid bash -c \
      'echo $$ > "$0"; exec python3 -m vllm.entrypoints.cli.main serve "$@"' "$pidf" "$MODEL" \
      --served-model-name llama8b --port "$port" --load-format dummy --gpu-memory-utilization 0.42 \
      --max-num-seqs 64 --max-model-len 8192 --enable-prefix-caching </dev/null >"$log" 2>&1 &
    for _ in $(seq 50); do [ -s "$pidf" ] && break; sleep 0.2; done
    pid=$(cat "$pidf")
    echo "server $n: pid $pid, port $port, log $log"
  fi
  while ! healthy "$port"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "server $n died after $(( $(date +%s) - t )) s; the end of $log:" >&2; tail -n 40 "$log" >&2; exit 1
    fi
    if (( $(date +%s) - t > TIMEOUT )); then
      echo "server $n not healthy after $TIMEOUT s; the end of $log:" >&2; tail -n 40 "$log" >&2; exit 1
    fi
    sleep 5
    if (( ($(date +%s) - t) % 15 < 5 )); then
      echo "  [$(( $(date +%s) - t ))s] server $n: $(tail -n 1 "$log" | cut -c1-160)"
    fi
  done
  echo "server $n healthy after $(( $(date +%s) - t )) s"
}

start 1 8001
start 2 8002

# Read back what each server says about its cache: the flag, its size, and the prefix counters
for port in 8001 8002; do
  python3 - "$port" <<'PY'
import re, sys, urllib.request
port = sys.argv[1]
page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
info = next((l for l in page.splitlines() if l.startswith("vllm:cache_config_info")), "")
def label(name):
    m = re.search(name + r'="([^"]*)"', info)
    return m.group(1) if m else "?"
series = sorted({l.split("{")[0] for l in page.splitlines() if l.startswith("vllm:prefix_cache_")})
print(f":{port} enable_prefix_caching={label('enable_prefix_caching')} "
      f"kv_cache_size_tokens={label('kv_cache_size_tokens')} num_gpu_blocks={label('num_gpu_blocks')} "
      f"series={','.join(series) or 'NONE'}")
if label("enable_prefix_caching") != "True" or not series:
    sys.exit(f":{port}: prefix caching is not on")
PY
done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
echo "both servers up in $(( $(date +%s) - T0 )) s"
