"""The in-process llama.cpp backend on a GPU: streamed throughput through the real gateway.

Run on the lent GPU machine after stage.sh (see README.md here):

    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu/llamacpp_gpu.py --model /tmp/model.gguf

For each user count it starts ``interlock serve`` with one ``kind: llamacpp`` backend
(``n_gpu_layers: -1``, ``parallel`` = the user count, at least 8), sends ``--rounds``
streamed chat completions per user with ``max_tokens`` tokens, and reports aggregate
delivered tok/s, TTFT p50/p95 and dropped streams; then one user against a direct
``llama_cpp.Llama`` call with the same settings. Prints a markdown table.

``--sampling greedy,sampled`` measures greedy replies and sampled ones (temperature 0.7,
top_p 0.9); ``--baseline DIR`` also runs the gateway from another checkout of the code (e.g.
``git archive <commit> gateway backends policies | tar -x -C DIR``), one after the other for
each user count, so two versions of the engine are compared in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

try:  # libllama before aiohttp: the other order segfaults CUDA builds in the model load
    import llama_cpp  # noqa: F401
except ImportError:
    pass
import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from benchmarks.common import SseStream, free_port, percentile

SUBJECTS = [
    "the sea",
    "a lighthouse",
    "a dragon",
    "Mars",
    "a library",
    "a clockmaker",
    "winter",
    "a city",
    "a river",
    "a fox",
    "the moon",
    "a violin",
    "a desert",
    "a robot",
    "a garden",
    "a storm",
]


SAMPLING = {"greedy": {"temperature": 0}, "sampled": {"temperature": 0.7, "top_p": 0.9}}


def start_gateway(
    model: str, parallel: int, n_ctx: int, port: int, work: Path, code: Path
) -> subprocess.Popen[bytes]:
    config = work / f"gpu-{parallel}.yaml"
    config.write_text(
        json.dumps(
            {
                "backends": {
                    "local": {
                        "kind": "llamacpp",
                        "model_path": model,
                        "n_gpu_layers": -1,
                        "parallel": parallel,
                        "n_ctx": n_ctx,
                        "n_batch": 512,
                        "max_queue": 1024,
                    }
                },
                "models": {"smollm2": {"targets": ["local"]}},
                "resilience": {"health_check": {"interval_s": 0}},
            }
        )
    )
    log = open(work / f"gateway-{parallel}.log", "wb")  # lives as long as the process
    cli = "import sys; from gateway.cli import main; main(sys.argv[1:])"
    argv = [
        sys.executable,
        "-c",
        cli,
        "serve",
        "--config",
        str(config),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=code, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"gateway did not get ready:\n{(work / f'gateway-{parallel}.log').read_text()[-3000:]}")


async def one(
    session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int, sampling: dict[str, float]
) -> tuple[float, int, bool]:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        **sampling,
    }
    started = time.perf_counter()
    ttft, tokens, finished = -1.0, 0, False
    stream = SseStream()
    async with session.post(url, json=body) as response:
        async for event in stream.events(response.content):
            if "error" in event:
                return ttft, tokens, False
            for choice in event.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    tokens += 1
                    if ttft < 0:
                        ttft = time.perf_counter() - started
                if choice.get("finish_reason"):
                    finished = True
    return ttft, tokens, finished and stream.done


async def load(
    port: int, users: int, rounds: int, max_tokens: int, sampling: dict[str, float]
) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    results: list[tuple[float, int, bool]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def user(u: int) -> None:
            for r in range(rounds):
                prompt = f"Write a long story about {SUBJECTS[(u + r) % len(SUBJECTS)]} (user {u}, part {r})."
                results.append(await one(session, url, prompt, max_tokens, sampling))

        await one(session, url, "Say hi.", 4, sampling)  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(user(u) for u in range(users)))
        wall = time.perf_counter() - started
    ttfts = sorted(t for t, _, _ in results if t >= 0)
    tokens = sum(n for _, n, _ in results)
    return {
        "tok_s": tokens / wall,
        "ttft_p50": 1000 * statistics.median(ttfts),
        "ttft_p95": 1000 * (percentile(ttfts, 0.95, method="nearest") or 0.0),
        "dropped": sum(not ok for *_, ok in results),
        "requests": len(results),
        "tokens": tokens,
        "wall": wall,
    }


def direct(model: str, max_tokens: int, rounds: int) -> float:
    import llama_cpp  # only here: the gateway's processes load it themselves

    llm = llama_cpp.Llama(model_path=model, n_gpu_layers=-1, n_ctx=4096, flash_attn=True, verbose=False)
    llm.create_chat_completion(messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
    tokens, started = 0, time.perf_counter()
    for r in range(rounds):
        prompt = f"Write a long story about {SUBJECTS[r]} (user 0, part {r})."
        for chunk in llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, stream=True
        ):
            if chunk["choices"][0]["delta"].get("content"):
                tokens += 1
    return tokens / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--users", default="1,8,32,64,128")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--sampling", default="greedy", help="comma list of: " + ", ".join(SAMPLING))
    p.add_argument("--baseline", type=Path, help="another checkout's root, run beside this one")
    p.add_argument("--baseline-name", default="baseline")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llamacpp-gpu-"))
    codes = [("this", Path.cwd())]
    if args.baseline:
        codes.append((args.baseline_name, args.baseline.resolve()))
    rows = []
    for mode in args.sampling.split(","):
        for users in (int(u) for u in args.users.split(",")):
            for name, root in codes:
                parallel = max(8, users)
                port = free_port()
                proc = start_gateway(args.model, parallel, 512 * parallel, port, work, root)
                try:
                    r = asyncio.run(load(port, users, args.rounds, args.max_tokens, SAMPLING[mode]))
                finally:
                    proc.terminate()
                    proc.wait(30)
                rows.append((name, mode, users, parallel, r))
                print(f"{name} {mode} {users} users: {r}", flush=True)
    one_user = direct(args.model, args.max_tokens, args.rounds)
    print(
        "\n| code | sampling | users | parallel | requests | aggregate tok/s | TTFT p50 ms | TTFT p95 ms "
        "| dropped |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, mode, users, parallel, r in rows:
        print(
            f"| {name} | {mode} | {users} | {parallel} | {r['requests']} | {r['tok_s']:,.0f} | "
            f"{r['ttft_p50']:.0f} | {r['ttft_p95']:.0f} | {r['dropped']} |"
        )
    if args.baseline:
        print(f"\nratio {codes[0][0]} / {args.baseline_name} (aggregate tok/s):")
        for name, mode, users, _, r in rows:
            if name == codes[0][0]:
                base = next(
                    b for n, m, u, _, b in rows if n == args.baseline_name and m == mode and u == users
                )
                print(f"- {mode}, {users} users: {r['tok_s'] / base['tok_s']:.2f}x")
    print(f"\ndirect llama_cpp.Llama, 1 user, greedy, same GPU: {one_user:,.0f} tok/s")
    first = next((r for n, m, u, _, r in rows if n == codes[0][0] and m == "greedy" and u == 1), None)
    if first:
        print(f"Interlock 1 user / direct: {first['tok_s'] / one_user:.2f}")
    print(f"GPU: {os.popen('nvidia-smi --query-gpu=name --format=csv,noheader').read().strip()}")


if __name__ == "__main__":
    main()
