"""A real embedding model through Interlock's ``kind: llamacpp``, against sentence-transformers.

    .venv/bin/python benchmarks/embeddings/check.py --gguf all-MiniLM-L6-v2.f16.gguf \\
        --reference reference.json

The GGUF is the model converted by llama.cpp's own ``convert_hf_to_gguf.py``; reference.json
comes from reference.py (sentence-transformers on the original weights, in an environment with
torch). Starts ``interlock serve`` with one embedding backend, embeds the sentences through
the official ``openai`` SDK and prints, per sentence, the cosine between Interlock's vector and
sentence-transformers'; then whether each pair of paraphrases is nearer each other than to any
other sentence; then throughput (``--batches`` requests of ``--batch`` sentences, 4 concurrent)
beside llama-cpp-python's own ``Llama(embedding=True).embed`` in this process, same threads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from sentences import PAIRS, SENTENCES  # noqa: E402

from benchmarks.common import free_port  # noqa: E402


def serve(gguf: str, threads: int, port: int, work: Path) -> subprocess.Popen[bytes]:
    config = work / "embed.yaml"
    config.write_text(
        json.dumps(
            {
                "backends": {
                    "embed": {
                        "kind": "llamacpp",
                        "model_path": gguf,
                        "n_threads": threads,
                        "n_batch": 512,
                        "parallel": 8,
                    }
                },
                "models": {"minilm": {"targets": ["embed"]}},
            }
        )
    )
    log = open(work / "gateway.log", "wb")  # lives as long as the process
    cli = "import sys; from gateway.cli import main; main(sys.argv[1:])"
    proc = subprocess.Popen(
        [
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
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit((work / "gateway.log").read_text()[-2000:])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--reference", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=20)
    args = p.parse_args()

    import numpy as np
    import openai

    reference = json.loads(Path(args.reference).read_text())
    assert reference["sentences"] == SENTENCES, "reference.json was made for other sentences"
    want = np.array(reference["vectors"], dtype=np.float32)
    port = free_port()
    proc = serve(args.gguf, args.threads, port, Path(tempfile.mkdtemp(prefix="embed-check-")))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        got = np.array(
            [d.embedding for d in client.embeddings.create(model="minilm", input=SENTENCES).data],
            dtype=np.float32,
        )
        cosines = (got * want).sum(axis=1)
        print(f"model: {Path(args.gguf).name}; reference: sentence-transformers ({reference['model']})\n")
        print("| sentence | cosine(Interlock, sentence-transformers) |\n|---|---:|")
        for sentence, cosine in zip(SENTENCES, cosines, strict=True):
            print(f"| {sentence} | {cosine:.6f} |")
        print(
            f"\nlowest cosine: {cosines.min():.6f}; largest difference in any component: "
            f"{np.abs(got - want).max():.2e}"
        )
        similarity = got @ got.T
        np.fill_diagonal(similarity, -1)
        print("\n| pair | cosine | nearest other | pair nearest |\n|---|---:|---:|---|")
        for i, j in PAIRS:
            others = max(similarity[i, k] for k in range(len(SENTENCES)) if k not in (i, j))
            print(f"| {i}-{j} | {similarity[i, j]:.3f} | {others:.3f} | {similarity[i, j] > others} |")

        corpus = [SENTENCES[k % len(SENTENCES)] + f" ({k})" for k in range(args.batch)]

        async def load() -> float:
            aclient = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
            )
            gate = asyncio.Semaphore(4)

            async def one() -> None:
                async with gate:
                    await aclient.embeddings.create(model="minilm", input=corpus)

            started = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(args.batches)))
            elapsed = time.perf_counter() - started
            await aclient.close()
            return elapsed

        asyncio.run(load())  # warm-up
        gateway_s = asyncio.run(load())
    finally:
        proc.terminate()
        proc.wait(30)

    from llama_cpp import Llama

    llm = Llama(
        model_path=args.gguf,
        embedding=True,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=512,
        n_ubatch=512,
        n_seq_max=8,
        flash_attn=True,
        verbose=False,
    )
    llm.embed(corpus, normalize=True)  # warm-up
    started = time.perf_counter()
    for _ in range(args.batches):
        llm.embed(corpus, normalize=True)
    direct_s = time.perf_counter() - started
    n = args.batch * args.batches
    print(
        f"\n| path | sentences/s ({args.batches} requests of {args.batch}, {args.threads} threads) |\n"
        "|---|---:|"
    )
    print(f"| Interlock /v1/embeddings, openai SDK, 4 concurrent | {n / gateway_s:,.0f} |")
    print(f"| llama-cpp-python Llama.embed, in process | {n / direct_s:,.0f} |")
    print(f"\nInterlock / direct: {direct_s / gateway_s:.2f}x")


if __name__ == "__main__":
    main()
