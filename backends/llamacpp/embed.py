"""Embeddings from an embedding GGUF (BERT, nomic-embed, bge, ...), in process.

``answer`` serves one ``/v1/embeddings`` request (OpenAI's shapes, from
``backends.llamacpp.chat``); ``EmbeddingEngine`` computes the vectors.

One context created with ``embeddings`` on and the model's own pooling (mean, CLS or
last token, from the GGUF). A request's inputs are packed into as few ``llama_decode``
calls as fit (``parallel`` inputs and ``n_batch`` tokens a call; each input whole in one
call, as non-causal models need), and every vector is L2-normalised, as OpenAI's are.

Requests run one after another on a single worker thread that owns the context (an
embedding request is one short burst of compute, not a stream to interleave); at most
``max_queue`` wait behind the running one, and the event loop never blocks on it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# llama_cpp must load before anything imports numpy (CUDA builds segfault otherwise).
import llama_cpp.llama_cpp as C
import numpy as np

from backends.base import BackendResponse, Usage
from backends.cpus import available_cpus
from backends.errors import BackendOverloaded, BackendUnavailable, ContextLengthExceeded, InvalidRequest
from backends.llamacpp.chat import embedding_inputs, embeddings_body, tokenize_sized
from backends.llamacpp.model import FLASH_ATTN, Model

_POOLING = {
    C.LLAMA_POOLING_TYPE_MEAN: "mean",
    C.LLAMA_POOLING_TYPE_CLS: "cls",
    C.LLAMA_POOLING_TYPE_LAST: "last",
}


async def answer(
    embedder: EmbeddingEngine, body: dict[str, Any], *, backend: str, model_id: str
) -> BackendResponse:
    """``/v1/embeddings`` on an embedding model: OpenAI's request and reply shapes."""
    model = embedder.model
    inputs = embedding_inputs(body.get("input"), model.n_vocab)
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != embedder.n_embd:
        raise InvalidRequest(
            f"model {model_id} gives {embedder.n_embd}-dimensional embeddings and cannot shorten them",
            param="dimensions",
        )
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise InvalidRequest("encoding_format must be 'float' or 'base64'", param="encoding_format")
    limit = embedder.max_input_tokens

    def too_long(index: int, what: str) -> ContextLengthExceeded:
        return ContextLengthExceeded(
            f"This model's maximum input length is {limit} tokens. However, "
            f"input {index} is {what}. Please shorten it.",
            param="input",
        )

    for index, text in enumerate(inputs):
        floor = model.min_tokens(text) if isinstance(text, str) else 0
        if floor > limit:
            raise too_long(index, f"{len(text):,} characters: at least {floor:,} tokens")
    tokens = await tokenize_sized(
        sum(len(i) for i in inputs if isinstance(i, str)),
        lambda: [
            model.tokenize(i, add_special=True, parse_special=False) if isinstance(i, str) else i
            for i in inputs
        ],
    )
    for index, one in enumerate(tokens):
        if len(one) > limit:
            raise too_long(index, f"{len(one)} tokens")
    try:
        vectors = await embedder.embed(tokens)
    except QueueFull:
        raise BackendOverloaded(
            f"llamacpp backend {backend!r} is busy: {embedder.max_queue} embedding requests waiting",
            retry_after=1.0,
        ) from None
    except RuntimeError as exc:
        raise BackendUnavailable(f"llamacpp backend {backend!r}: {exc}") from exc
    n_tokens = sum(len(one) for one in tokens)
    name = body.get("model")
    reply = embeddings_body(
        vectors, name if isinstance(name, str) else model_id, n_tokens, base64=encoding == "base64"
    )
    return BackendResponse(reply, Usage(n_tokens, 0))


class QueueFull(Exception):
    """More requests are waiting than ``max_queue`` allows."""


class EmbeddingEngine:
    """Owns a context of ``model`` (and frees both on ``close``); blocking to create."""

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int,
        n_threads: int | None,
        n_batch: int,
        parallel: int,
        max_queue: int,
        flash_attn: str = "auto",
    ) -> None:
        self.model = model
        params = C.llama_context_default_params()
        params.n_ctx = max(n_ctx, n_batch)
        params.n_batch = params.n_ubatch = n_batch  # one input must fit one micro-batch
        params.n_seq_max = parallel
        params.embeddings = True
        params.flash_attn_type = FLASH_ATTN[flash_attn]
        params.n_threads = params.n_threads_batch = n_threads or available_cpus()
        self._ctx = C.llama_init_from_model(model.ptr, params)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create an embedding context for {model.path}")
        pooling = C.llama_pooling_type(self._ctx)
        if pooling not in _POOLING:
            C.llama_free(self._ctx)
            raise RuntimeError(
                f"{model.path} pools its tokens as type {pooling} (a reranker or no "
                "pooling): the llamacpp backend serves embeddings of mean, CLS or "
                "last-token pooling"
            )
        self.pooling = _POOLING[pooling]
        self._mem = C.llama_get_memory(self._ctx)  # None for BERT-like models: nothing to clear
        self.n_embd = model.n_embd
        self.parallel = parallel
        self.max_queue = max_queue
        #: the longest input: one micro-batch, no further than the model's positions go, and (for
        #: a model with a KV cache, e.g. a decoder pooling its last token) within one sequence's cells
        self.max_input_tokens = min(n_batch, C.llama_model_n_ctx_train(model.ptr) or n_batch)
        if self._mem:
            self.max_input_tokens = min(self.max_input_tokens, C.llama_n_ctx_seq(self._ctx))
        self._n_batch = n_batch
        self._batch = C.llama_batch_init(n_batch, 0, 1)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llamacpp-embed")
        self._lock = threading.Lock()
        self._pending = 0  # requests running or waiting
        self.error: str | None = None

    @property
    def n_active(self) -> int:
        return min(self._pending, 1)

    @property
    def n_waiting(self) -> int:
        return max(self._pending - 1, 0)

    @property
    def alive(self) -> bool:
        return self._ctx is not None and self.error is None

    async def embed(self, inputs: Sequence[list[int]]) -> list[np.ndarray]:
        """One unit vector per input (each already checked to fit ``max_input_tokens``)."""
        with self._lock:
            if self._pending > self.max_queue:  # one running and max_queue waiting already
                raise QueueFull
            self._pending += 1
        work = self._executor.submit(self._embed, inputs)
        # counted until the work ends or is dropped unstarted, not until this caller gives up:
        # a client that hangs up cannot free a place its inputs still hold on the worker
        work.add_done_callback(self._done)
        return await asyncio.wrap_future(work)

    def _done(self, _: object) -> None:
        with self._lock:
            self._pending -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._ctx is not None:
            C.llama_batch_free(self._batch)
            C.llama_free(self._ctx)
            self._ctx = None
        self.model.free()

    # ---- worker thread -------------------------------------------------------------------

    def _embed(self, inputs: Sequence[list[int]]) -> list[np.ndarray]:
        vectors: list[np.ndarray] = []
        group: list[list[int]] = []
        size = 0
        for tokens in inputs:
            if group and (len(group) == self.parallel or size + len(tokens) > self._n_batch):
                vectors.extend(self._decode(group))
                group, size = [], 0
            group.append(tokens)
            size += len(tokens)
        if group:
            vectors.extend(self._decode(group))
        return vectors

    def _decode(self, group: list[list[int]]) -> list[np.ndarray]:
        if self._mem:
            C.llama_memory_clear(self._mem, True)
        batch, n = self._batch, 0
        for seq, tokens in enumerate(group):
            for pos, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, pos, 1, 1
                batch.seq_id[n][0] = seq
                n += 1
        batch.n_tokens = n
        rc = C.llama_decode(self._ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed (code {rc}) on {len(group)} inputs, {n} tokens")
        vectors = []
        for seq in range(len(group)):
            pointer = C.llama_get_embeddings_seq(self._ctx, seq)
            vector = np.ctypeslib.as_array(pointer, shape=(self.n_embd,)).astype(np.float32)
            norm = float(np.linalg.norm(vector))
            vectors.append(vector / norm if norm > 0 else vector)
        return vectors


__all__ = ["EmbeddingEngine", "QueueFull", "answer"]
