"""The in-process llama.cpp backend (``kind: llamacpp``).

Construction only validates and remembers the config; ``start()`` loads the GGUF
once, in a worker thread (``backends.llamacpp.model``), and starts the batching engine
(``backends.llamacpp.engine``), or, for an embedding model (one whose GGUF declares a
pooling), the embedding engine (``backends.llamacpp.embed``), which serves
``/v1/embeddings`` only. Requests are rendered and tokenized on the event
loop, so errors known up front (prompt too long, queue full, unsupported options)
raise before ``stream()`` returns and the router can still fall back.

Context: the ``n_ctx`` KV cells are split evenly between the ``parallel``
sequences, so one request may use ``n_ctx // parallel`` tokens, prompt and reply
together. A prompt that leaves no room is a 400; a ``max_tokens`` beyond the room
left is clamped and the reply ends with ``finish_reason: "length"``. The settings are
``backends.llamacpp.config``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from backends.base import BackendRequest, BackendResponse, Health, Load, Resources, Usage
from backends.errors import (
    BackendOverloaded,
    BackendUnavailable,
    ContextLengthExceeded,
    InvalidRequest,
    UnsupportedEndpoint,
)
from backends.llamacpp.chat import make_chat_renderer, tokenize_sized
from backends.llamacpp.config import (
    CPU_FOLLOW_UP_WAIT_MS,
    CPU_PREFILL_CHUNK,
    DEFAULT_GGUF,
    LlamaCppConfig,
    default_model_path,
)
from backends.llamacpp.options import sampling_of
from backends.openai_frames import ReplyFrames

if TYPE_CHECKING:
    from backends.llamacpp.embed import EmbeddingEngine
    from backends.llamacpp.engine import Engine, Job

log = logging.getLogger("interlock.backends.llamacpp")


class ModelLoadError(RuntimeError):
    """start() could not load the model; the message names the file."""


class LlamaCppBackend:
    kind = "llamacpp"

    def __init__(self, name: str, config: LlamaCppConfig, resources: Resources | None = None) -> None:
        self.name = name
        self.config = config
        self.model_path = config.model_path or default_model_path() or DEFAULT_GGUF
        self.model_id = os.path.basename(self.model_path).removesuffix(".gguf")
        self._engine: Engine | None = None  # a generative model's
        self._embedder: EmbeddingEngine | None = None  # an embedding model's
        self._mod: Any = None  # backends.llamacpp.engine, once start() imported it
        self._embed_mod: Any = None  # backends.llamacpp.embed, likewise
        self._render: Callable[[list[Any]], list[tuple[str, bool]]] | None = None
        self._state = "not started"

    async def start(self) -> None:
        if self._engine is not None or self._embedder is not None:
            return
        self._state = f"loading model {self.model_path}"
        log.info("%s: loading model %s", self.name, self.model_path)
        try:
            await asyncio.to_thread(self._load)
        except Exception as exc:
            self._state = f"model failed to load: {exc}"
            log.error("%s: %s", self.name, self._state)
            raise ModelLoadError(
                f"llamacpp backend {self.name!r}: cannot load model {self.model_path}: {exc}"
            ) from exc
        if self._embedder is not None:
            m = self._embedder
            log.info(
                "%s: loaded embedding model %s in %.1fs: %d dimensions, %s pooling, inputs of "
                "up to %d tokens",
                self.name,
                self.model_id,
                m.model.load_seconds,
                m.n_embd,
                m.pooling,
                m.max_input_tokens,
            )
        elif (e := self._engine) is not None:
            log.info(
                "%s: loaded %s in %.1fs: n_ctx %d = %d sequences x %d tokens, n_batch %d",
                self.name,
                self.model_id,
                e.model.load_seconds,
                e.n_ctx,
                e.parallel,
                e.n_ctx_seq,
                self.config.n_batch,
            )

    def _load(self) -> None:
        # These load libllama: only here, never at import.
        from backends.llamacpp import embed as llamacpp_embed
        from backends.llamacpp import engine as llamacpp_engine
        from backends.llamacpp.model import Model

        c = self.config
        model = Model(self.model_path, n_gpu_layers=c.n_gpu_layers)
        try:
            if model.embedding:
                self._embed_mod = llamacpp_embed
                self._embedder = llamacpp_embed.EmbeddingEngine(
                    model,
                    n_ctx=c.n_ctx,
                    n_threads=c.n_threads,
                    n_batch=c.n_batch,
                    parallel=c.parallel,
                    max_queue=c.max_queue,
                    flash_attn=c.flash_attn,
                )
                return
            engine = llamacpp_engine.Engine(
                model,
                n_ctx=c.n_ctx,
                n_threads=c.n_threads,
                n_batch=c.n_batch,
                parallel=c.parallel,
                max_queue=c.max_queue,
                flash_attn=c.flash_attn,
                prefill_chunk=c.prefill_chunk or (c.n_batch if c.n_gpu_layers != 0 else CPU_PREFILL_CHUNK),
                follow_up_wait_ms=(
                    c.follow_up_wait_ms
                    if c.follow_up_wait_ms is not None
                    else 0.0
                    if c.n_gpu_layers != 0
                    else CPU_FOLLOW_UP_WAIT_MS
                ),
                kv_unified=c.n_gpu_layers != 0 if c.kv_unified is None else c.kv_unified,
            )
        except BaseException:
            model.free()
            raise
        template = c.chat_template or model.chat_template
        if template:
            self._render = make_chat_renderer(template, model.bos_token, model.eos_token)
        self._mod = llamacpp_engine
        self._engine = engine

    async def close(self) -> None:
        running: Engine | EmbeddingEngine | None = self._engine or self._embedder
        self._engine = self._embedder = None
        self._state = "closed"
        if running is not None:
            await asyncio.to_thread(running.close)

    async def health(self) -> Health:
        running = self._engine or self._embedder
        if running is None:
            return Health(False, self._state)
        if not running.alive:
            return Health(False, running.error or "engine stopped")
        return Health(True)

    def describe(self) -> dict[str, object]:
        return {
            "model": self.model_id,
            "state": self._state if self._engine is None and self._embedder is None else "running",
        }

    def fatal(self) -> str | None:
        """Why the engine thread died, once it has (not while loading, not after close())."""
        running = self._engine or self._embedder
        if running is None or running.alive:
            return None
        return running.error or "the llamacpp engine stopped"

    def load(self) -> Load:
        e = self._engine or self._embedder
        if e is None:
            return Load(capacity=self.config.parallel)
        return Load(
            in_flight=e.n_active,
            queued=e.n_waiting,
            capacity=e.parallel,
            full=e.n_active + e.n_waiting >= e.parallel + e.max_queue,
        )

    async def complete(self, request: BackendRequest) -> BackendResponse:
        if request.endpoint == "embeddings" and self._embedder is not None:
            return await self._embed_mod.answer(
                self._embedder, request.body, backend=self.name, model_id=self.model_id
            )
        job, queue, frames = await self._submit(request)
        parts: list[str] = []
        try:
            while True:
                event = await queue.get()
                if type(event) is str:
                    parts.append(event)
                elif isinstance(event, self._mod.Finished):
                    break
                else:
                    raise BackendUnavailable(f"llamacpp backend {self.name!r}: {event.message}")
        except BaseException:
            self._cancel(job)  # no-op when it already ended
            raise
        usage = Usage(event.prompt_tokens, event.completion_tokens)
        return BackendResponse(frames.text_body("".join(parts), event.reason, usage), usage)

    async def stream(self, request: BackendRequest) -> AsyncIterator[bytes]:
        job, queue, frames = await self._submit(request)
        return _SSEStream(self, job, queue, frames)

    def _cancel(self, job: Job) -> None:
        engine = self._engine
        if engine is not None:
            engine.cancel(job)

    # ---- request → engine ------------------------------------------------------------

    async def _submit(self, request: BackendRequest) -> tuple[Job, asyncio.Queue[Any], ReplyFrames]:
        if self._embedder is not None:
            raise UnsupportedEndpoint(
                f"the llamacpp backend {self.name!r} serves an embedding model "
                f"({self.model_id}): use /v1/embeddings"
            )
        engine = self._engine
        if engine is None or not engine.alive:
            raise BackendUnavailable(
                f"llamacpp backend {self.name!r} is not ready: {engine.error if engine else self._state}"
            )
        body = request.body
        if request.endpoint == "embeddings":
            raise UnsupportedEndpoint(
                f"the llamacpp backend {self.name!r} serves a generative model "
                f"({self.model_id}) and has no embeddings"
            )
        sampling = sampling_of(body, request.endpoint)
        tokens, param = await self._prompt_tokens(body, request.endpoint, engine)
        if len(tokens) >= engine.n_ctx_seq:
            raise _too_long(
                engine, param, f"resulted in {len(tokens)} tokens, which leaves no room for a reply"
            )
        queue: asyncio.Queue[Any] = asyncio.Queue()
        job = engine.submit(tokens, sampling, queue)
        if job is None:
            raise BackendOverloaded(
                f"llamacpp backend {self.name!r} is busy: {engine.parallel} requests running and "
                f"{engine.max_queue} waiting",
                retry_after=1.0,
            )
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        model = body.get("model")
        frames = ReplyFrames(
            request.endpoint == "chat",
            model if isinstance(model, str) else self.model_id,
            include_usage=include_usage,
        )
        return job, queue, frames

    async def _prompt_tokens(
        self, body: dict[str, Any], endpoint: str, engine: Engine
    ) -> tuple[list[int], str]:
        if endpoint == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise InvalidRequest("messages must be a non-empty list", param="messages")
            if self._render is None:
                raise UnsupportedEndpoint(
                    f"model {self.model_id} has no chat template; set chat_template in the backend config",
                    param="messages",
                )
            # Only the template's own text holds special tokens (BOS included): the messages' text
            # is tokenized as text, so a "<|im_start|>" a user types stays characters.
            parts = self._render(messages)
            text = "".join(part for part, _ in parts)
            return await self._tokenize(
                engine, text, "messages", lambda: engine.model.tokenize_parts(parts)
            ), "messages"
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            # an id outside the vocabulary fails the whole llama_decode batch, others' streams too
            n_vocab = engine.model.n_vocab
            if min(prompt) < 0 or max(prompt) >= n_vocab:
                i, bad = next((i, t) for i, t in enumerate(prompt) if not 0 <= t < n_vocab)
                raise InvalidRequest(
                    f"prompt[{i}] is token id {bad}, outside this model's vocabulary "
                    f"of {n_vocab} tokens (ids 0 to {n_vocab - 1})",
                    param="prompt",
                )
            return list(prompt), "prompt"
        if not isinstance(prompt, str):
            raise InvalidRequest(
                "prompt must be a string or a list of one string (batched prompts "
                "are not supported by the llamacpp backend)",
                param="prompt",
            )
        # A prompt is all the caller's own text: its special-token text is parsed, as llama.cpp's
        # server and OpenAI's completions do (a hand-written ChatML prompt works).
        tokens = (
            []
            if not prompt
            else await self._tokenize(
                engine, prompt, "prompt", lambda: engine.model.tokenize(prompt, add_special=True)
            )
        )
        if not tokens:
            if engine.model.bos_id < 0:
                raise InvalidRequest("prompt must not be empty", param="prompt")
            tokens = [engine.model.bos_id]
        return tokens, "prompt"

    async def _tokenize(
        self, engine: Engine, text: str, param: str, tokenize: Callable[[], list[int]]
    ) -> list[int]:
        """``tokenize()``, the tokens of ``text``; a text far too long for the context is refused
        before tokenizing."""
        floor = engine.model.min_tokens(text)
        if floor >= engine.n_ctx_seq:
            raise _too_long(engine, param, f"is {len(text):,} characters long: at least {floor:,} tokens")
        return await tokenize_sized(len(text), tokenize)


def _too_long(engine: Engine, param: str, what: str) -> ContextLengthExceeded:
    return ContextLengthExceeded(
        f"This model's context is {engine.n_ctx_seq} tokens per request (n_ctx {engine.n_ctx} "
        f"shared by {engine.parallel} parallel sequences). However, your {param} {what}. Please "
        f"reduce the length of the {param}.",
        param=param,
    )


class _SSEStream:
    """The stream() iterator. Closing it, cancelling its reader or dropping it frees the sequence."""

    def __init__(
        self, backend: LlamaCppBackend, job: Job, queue: asyncio.Queue[Any], frames: ReplyFrames
    ) -> None:
        self._backend = backend
        self._job: Job | None = job
        self._queue = queue
        self._frames = frames
        # Held back and sent with the first token (or the end): the gateway times the first byte
        # as the time to first token, and the role is known before the prompt is even read.
        self._role = frames.role_chunk() or b""
        self._ready: deque[bytes] = deque()

    def __aiter__(self) -> _SSEStream:
        return self

    async def __anext__(self) -> bytes:
        if self._ready:
            return self._ready.popleft()
        if self._job is None:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except BaseException:
            self._cancel()
            raise
        role, self._role = self._role, b""
        if type(event) is str:
            return role + self._frames.delta_chunk(event)
        self._job = None
        if isinstance(event, self._backend._mod.Finished):
            self._ready.extend(
                self._frames.final_chunks(event.reason, Usage(event.prompt_tokens, event.completion_tokens))
            )
            return role + self._ready.popleft()
        raise BackendUnavailable(f"llamacpp backend {self._backend.name!r}: {event.message}")

    async def aclose(self) -> None:
        self._cancel()

    def _cancel(self) -> None:
        job, self._job = self._job, None
        if job is not None:
            self._backend._cancel(job)

    def __del__(self) -> None:
        self._cancel()
