"""A simulator of a vLLM 0.26.0 server, reproducing the captured fixtures.

``tests/fixtures/vllm-0.26.0/*.json`` hold what a real vLLM 0.26.0 (SmolLM2 on an H100)
answered to every endpoint (captured on the GPU machine; ``INTERLOCK_VLLM_FIXTURES`` points at
another capture). ``VllmSim`` is an aiohttp server in a thread that gives the same
bytes where a gateway depends on them:

- replies and SSE framing with vLLM's extra fields (``token_ids``, ``stop_reason``,
  ``prompt_token_ids`` on the role chunk, ``system_fingerprint`` on the last chunk), the
  ``include_usage`` chunk with ``"choices": []``, ``data: [DONE]``; the text is the captured
  reply's tokens, so a fixture's request gets the fixture's reply (ids and times aside);
- ``/health``, ``/ping``, ``/version``, ``/load``, ``/v1/models`` and ``/metrics`` (the captured
  page, with the running, waiting, KV-usage and prefix-cache series kept live);
- the error bodies: unknown model 404, pydantic 400s, the over-context 400 with its numbers,
  ``tool_choice: auto`` 400, ``{"detail": "Not Found"}`` for embeddings and unknown paths;
- the rough edges: ``messages: []`` resets the connection, a JSON array body gets a 500, a
  missing ``model`` is served by the default model.

Guessed, not captured: the last chunk of a completions stream without ``include_usage``
(taken to carry ``system_fingerprint`` as chat's does); token counts (a word/punctuation count
stands in for the tokenizer).

Time is modelled by a scheduler like vLLM's (``tests.vllm_engine``): after ``base_ttft_s`` in
the API server, a request waits for admission (at most ``max_num_seqs`` run, within
``kv_capacity_tokens``), then engine steps each decode one token per running sequence and spend
a ``step_budget_chars`` budget on prefills, first come first served; a step takes
``decode_s_per_token``, ``slowdown_per_running`` longer per other sequence in it, plus
``prefill_s_per_char`` per prefill character. Each server keeps an LRU of the prompt blocks it
has cached (looked up at admission, filled when a prefill ends), so prefix caching matters and
so does what is queued where. ``requests[i]["ttft_s"]`` is the TTFT on the engine's simulated
clock, which a loaded machine's late wake-ups do not stretch.
``kill()`` closes the listening socket and every open connection mid-load; ``revive()``
listens again. Several instances on different ports (or loopback addresses) form a pool.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
from aiohttp import web

from tests.fakes import free_port
from tests.vllm_engine import Engine, Seq

T = TypeVar("T")

FIXTURES = Path(
    os.environ.get("INTERLOCK_VLLM_FIXTURES") or Path(__file__).resolve().parent / "fixtures" / "vllm-0.26.0"
)
FINGERPRINT = "vllm-0.26.0-fad12e9d"
#: the captured chat reply to "Name three colors." (temperature 0), token by token
CHAT_TOKENS = [
    "The",
    " most",
    " obvious",
    " color",
    " is",
    " red",
    ",",
    " but",
    " there",
    " are",
    " many",
    " more",
    ".",
    " Some",
    " examples",
    " include",
    " blue",
    ",",
    " green",
    ",",
    " and",
    " yellow",
    ",",
    " while",
]
#: the captured completion of "The sky is"
COMPLETION_TOKENS = [" a", " canvas", " of", " colors", ","]
#: tokens a reply has when the request sets no max_tokens (then finish_reason is "stop")
NATURAL_LENGTH = 16
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

_TOKEN = re.compile(r"<\|[a-z_]+\|>|\w+|[^\w\s]")
_LIVE_SERIES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
)
_LEGACY_NAMES = (
    ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    ("vllm:prefix_cache_", "vllm:gpu_prefix_cache_"),
)


def fixture(name: str) -> dict[str, Any]:
    """A captured exchange."""
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))
    return data


def metrics_template() -> str:
    body: str = fixture("metrics_idle")["body"]
    return body


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def _json(status: int, body: object) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _error(status: int, message: str, type_: str, param: str | None = None) -> web.Response:
    return _json(status, {"error": {"message": message, "type": type_, "param": param, "code": status}})


def _not_found() -> web.Response:
    return _json(404, {"detail": "Not Found"})


def _fmt(value: float) -> str:
    return repr(float(value))


@dataclass
class VllmSim:
    model: str = "smollm2"
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    #: set by kill(): requests on connections that outlived it are dropped, not answered
    _dead: bool = field(default=False, init=False, repr=False)
    max_model_len: int = 4096
    max_num_seqs: int = 16
    base_ttft_s: float = 0.002
    #: 0.02 ms per uncached character: a 10,000-character prompt takes 200 ms to prefill
    prefill_s_per_char: float = 0.00002
    decode_s_per_token: float = 0.001
    #: each other running request slows every step by this share
    slowdown_per_running: float = 0.05
    #: prefill characters one step computes at most (chunked prefill; ~8k tokens)
    step_budget_chars: int = 32768
    cache_blocks: int = 4096
    block_chars: int = 64
    kv_capacity_tokens: int = 65536
    #: serve the metric names of vLLM <= 0.10 (gpu_cache_usage_perc, gpu_prefix_cache_*)
    legacy_metrics: bool = False

    # knobs a test may turn while it runs
    #: requests /metrics reports beyond the simulated ones (other clients of a shared server)
    extra_running: int = 0
    extra_waiting: int = 0
    #: answer the next N generation requests with a 500
    fail_next: int = 0
    #: False: GET /health answers 500
    healthy: bool = True
    #: seconds GET /health takes to answer (a check overlapping other events)
    health_delay_s: float = 0.0

    # what happened
    prefix_queries: int = 0
    prefix_hits: int = 0
    cancelled: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self._engine = Engine(self, self._admitted, self._prefix_insert)
        text = metrics_template().replace('model_name="smollm2"', f'model_name="{self.model}"')
        if self.legacy_metrics:
            for new, old in _LEGACY_NAMES:
                text = text.replace(new, old)
        self._metric_lines = text.split("\n")
        self._live: list[tuple[int, str]] = []
        for i, line in enumerate(self._metric_lines):
            name = line.split("{", 1)[0]
            canonical = name
            if self.legacy_metrics:
                for new, old in _LEGACY_NAMES:
                    canonical = canonical.replace(old, new)
            if canonical in _LIVE_SERIES or (
                canonical == "vllm:num_requests_waiting_by_reason" and 'reason="capacity"' in line
            ):
                self._live.append((i, canonical))
        self._started = time.time()

    # -- running it -----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, as clients configure it."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def served(self) -> int:
        return len(self.requests)

    @property
    def running(self) -> int:
        """Requests admitted to the engine (prefilling or decoding)."""
        return len(self._engine.running)

    @property
    def waiting(self) -> int:
        return len(self._engine.waiting)

    def reset(self) -> None:
        """Forget the cache, the counters and the knobs (between tests sharing a server)."""
        self._call(self._reset)

    async def _reset(self) -> None:
        self._cache.clear()
        self.prefix_queries = self.prefix_hits = self.cancelled = 0
        self.extra_running = self.extra_waiting = self.fail_next = 0
        self.healthy = True
        self._dead = False
        self.requests.clear()
        self.disconnected.clear()

    def __enter__(self) -> VllmSim:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(self._setup())
            ready.set()
            loop.run_forever()
            self._engine_task.cancel()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name=f"vllm-sim-{self.port}")
        self._thread.start()
        if not ready.wait(5):
            raise RuntimeError("the vLLM simulator did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _setup(self) -> None:
        self._engine_task = asyncio.create_task(self._engine.run())
        app = web.Application(middlewares=[self._dead_gate, _json_404])
        app.on_response_prepare.append(_uvicorn_headers)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ping", self._health)
        app.router.add_get("/version", self._version)
        app.router.add_get("/load", self._load)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        # vLLM aborts a request whose client went away; handler cancellation does the same here
        self._runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()

    def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(5)

    def kill(self) -> None:
        """Die mid-load: stop listening and drop every open connection, as a crashed server does."""
        self._call(self._kill)

    @web.middleware
    async def _dead_gate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # A connection accepted while kill() ran can outlive it; a dead server answers nothing on it.
        if self._dead:
            if request.transport is not None:
                _linger0(request.transport)
                request.transport.abort()
            raise ConnectionResetError("the simulated server is dead")
        return await handler(request)

    async def _kill(self) -> None:
        self._dead = True
        await self._site.stop()
        server = self._runner.server
        for handler in server.connections if server else ():
            transport = handler.transport
            if transport is not None:
                _linger0(transport)
                transport.abort()

    def revive(self) -> None:
        """Listen again (the prefix cache starts cold, as after a restart)."""
        self._call(self._revive)

    async def _revive(self) -> None:
        self._dead = False
        self._cache.clear()
        await self._listen()

    # -- plain endpoints ------------------------------------------------------------------------

    async def _health(self, _: web.Request) -> web.Response:
        if self.health_delay_s:
            await asyncio.sleep(self.health_delay_s)
        return web.Response(status=200 if self.healthy else 500)

    async def _version(self, _: web.Request) -> web.Response:
        return _json(200, {"version": "0.26.0"})

    async def _load(self, _: web.Request) -> web.Response:
        return _json(200, {"server_load": self.running + self.waiting})

    async def _models(self, _: web.Request) -> web.Response:
        created = int(time.time())
        permission = {
            "id": f"modelperm-{os.urandom(8).hex()}",
            "object": "model_permission",
            "created": created,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }
        return _json(
            200,
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model,
                        "object": "model",
                        "created": created,
                        "owned_by": "vllm",
                        "root": "/tmp/smollm2-hf",
                        "parent": None,
                        "max_model_len": self.max_model_len,
                        "permission": [permission],
                    }
                ],
            },
        )

    def metrics_text(self) -> str:
        values = {
            "vllm:num_requests_running": self.running + self.extra_running,
            "vllm:num_requests_waiting": self.waiting + self.extra_waiting,
            "vllm:num_requests_waiting_by_reason": self.waiting + self.extra_waiting,
            "vllm:kv_cache_usage_perc": min(1.0, self._engine.kv_tokens / self.kv_capacity_tokens),
            "vllm:prefix_cache_queries_total": self.prefix_queries,
            "vllm:prefix_cache_hits_total": self.prefix_hits,
        }
        lines = list(self._metric_lines)
        for i, series in self._live:
            line = lines[i]
            lines[i] = line[: line.rindex(" ") + 1] + _fmt(values[series])
        return "\n".join(lines)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics_text().encode(),
            headers={"Content-Type": "text/plain; version=1.0.0; charset=utf-8"},
        )

    # -- generation -----------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completions")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as exc:
            detail = {
                "type": "json_invalid",
                "loc": ("body", exc.pos),
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": exc.msg},
            }
            return _error(400, f"1 validation error:\n  {detail}", "Bad Request", f"body.{exc.pos}")
        if not isinstance(body, dict):
            return _error(
                500, f"'{type(body).__name__}' object has no attribute 'get'", "InternalServerError"
            )
        if kind == "chat" and body.get("messages") == []:
            _reset_connection(request)
            return web.Response()
        problem = self._invalid(body)
        if problem is not None:
            return problem
        if self.fail_next > 0:
            self.fail_next -= 1
            return _error(
                500,
                "EngineCore encountered an issue. See stack trace (above) for the root cause.",
                "InternalServerError",
            )
        prompt = self._render(kind, body)
        prompt_tokens = count_tokens(prompt)
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        too_long = self._over_context(prompt_tokens, max_tokens)
        if too_long is not None:
            return too_long
        record: dict[str, Any] = {
            "kind": kind,
            "body": body,
            "prompt_chars": len(prompt),
            "cached_chars": 0,
            "headers": {k.lower(): v for k, v in request.headers.items()},
        }
        self.requests.append(record)
        tokens, finish, stop = self._reply_tokens(kind, body, max_tokens, prompt_tokens)
        seq = Seq(prompt, prompt_tokens, len(tokens))
        try:
            await asyncio.sleep(self.base_ttft_s)  # the API server: parsing, tokenising
            self._engine.submit(seq)
            await seq.out.get()  # the prefill is done: the first token (or the end of a 0-token reply)
            record["cached_chars"] = seq.cached_chars
            record["ttft_s"] = self.base_ttft_s + (seq.ttft_s or 0.0)
            if body.get("stream"):
                return await self._stream(request, kind, body, tokens, finish, stop, prompt_tokens, seq)
            while seq.tokens and await seq.out.get() is not None:
                pass
            return _json(200, self._reply(kind, body, tokens, finish, stop, prompt_tokens))
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled += 1
            self.disconnected.set()
            raise
        finally:
            seq.aborted = True  # the engine drops it if it is still there

    def _invalid(self, body: dict[str, Any]) -> web.Response | None:
        model = body.get("model")
        if model is not None and model != self.model:  # absent: the default model serves it
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        for name in ("temperature", "top_p"):
            value = body.get(name)
            if isinstance(value, str):
                detail = {
                    "type": "float_parsing",
                    "loc": ("body", name),
                    "msg": "Input should be a valid number, unable to parse string as a number",
                    "input": value,
                }
                return _error(400, f"1 validation error:\n  {detail}", "Bad Request", f"body.{name}")
        if body.get("tool_choice") == "auto":
            return _error(
                400,
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                "BadRequestError",
            )
        return None

    def _over_context(self, prompt_tokens: int, max_tokens: int | None) -> web.Response | None:
        limit = self.max_model_len
        if max_tokens is not None and max_tokens > limit:
            return _error(
                400,
                f"max_tokens={max_tokens} cannot be greater than "
                f"max_model_len=max_total_tokens={limit}. Please request fewer output tokens. "
                f"(parameter=max_tokens, value={max_tokens})",
                "BadRequestError",
                "max_tokens",
            )
        wanted = max_tokens or 1
        if prompt_tokens + wanted <= limit:
            return None
        at_least = min(prompt_tokens, limit - wanted + 1)
        return _error(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{wanted} output tokens and your prompt contains at least {at_least} input tokens, "
            f"for a total of at least {at_least + wanted} tokens. Please reduce the length of "
            f"the input prompt or the number of requested output tokens. "
            f"(parameter=input_tokens, value={at_least})",
            "BadRequestError",
            "input_tokens",
        )

    @staticmethod
    def _render(kind: str, body: dict[str, Any]) -> str:
        """SmolLM2's chat template (with its default system prompt), or the completion prompt."""
        if kind == "completions":
            prompt = body.get("prompt")
            return prompt if isinstance(prompt, str) else json.dumps(prompt)
        messages = [m for m in body.get("messages") or () if isinstance(m, dict)]
        if not messages or messages[0].get("role") != "system":
            messages = [{"role": "system", "content": SMOLLM2_SYSTEM}, *messages]
        parts = []
        for m in messages:
            content = m.get("content")
            text = content if isinstance(content, str) else json.dumps(content)
            parts.append(f"<|im_start|>{m.get('role')}\n{text}<|im_end|>\n")
        return "".join(parts) + "<|im_start|>assistant\n"

    def _blocks(self, prompt: str) -> list[bytes]:
        keys, previous = [], b""
        for start in range(0, len(prompt) - self.block_chars + 1, self.block_chars):
            previous = hashlib.blake2b(
                previous + prompt[start : start + self.block_chars].encode(), digest_size=12
            ).digest()
            keys.append(previous)
        return keys

    def _admitted(self, seq: Seq) -> int:
        """Characters of the prompt's prefix cached here (the engine admits it now), counted as
        vLLM's prefix-cache counters count them."""
        cached = 0
        for key in self._blocks(seq.prompt):
            if key not in self._cache:
                break
            self._cache.move_to_end(key)
            cached += self.block_chars
        self.prefix_queries += seq.prompt_tokens
        self.prefix_hits += min(
            seq.prompt_tokens, round(seq.prompt_tokens * cached / max(1, len(seq.prompt)))
        )
        return cached

    def _prefix_insert(self, prompt: str) -> None:
        """A prefill is done: its prompt's blocks are cached (the least recently used go first)."""
        for key in self._blocks(prompt):
            self._cache[key] = None
            self._cache.move_to_end(key)
        while len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)

    def _reply_tokens(
        self, kind: str, body: dict[str, Any], max_tokens: int | None, prompt_tokens: int
    ) -> tuple[list[str], str, str | None]:
        """The reply's tokens, finish reason and stop reason (a matched stop string is generated,
        counted in usage, and not returned, as vLLM does)."""
        source = CHAT_TOKENS if kind == "chat" else COMPLETION_TOKENS
        count = (
            max_tokens if max_tokens is not None else min(NATURAL_LENGTH, self.max_model_len - prompt_tokens)
        )
        stops = body.get("stop")
        stops = [stops] if isinstance(stops, str) else list(stops or ())
        tokens: list[str] = []
        for i in range(count):
            token = source[i % len(source)]
            hit = next((s for s in stops if s and s in token), None)
            if hit is not None:
                return tokens, "stop", hit
            tokens.append(token)
        return tokens, "length" if max_tokens is not None else "stop", None

    def _reply(
        self,
        kind: str,
        body: dict[str, Any],
        tokens: list[str],
        finish: str,
        stop: str | None,
        prompt_tokens: int,
    ) -> dict[str, Any]:
        text = "".join(tokens)
        n = int(body.get("n") or 1)
        generated = n * (len(tokens) + (stop is not None))
        usage = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + generated,
            "completion_tokens": generated,
            "prompt_tokens_details": None,
        }
        head = {
            "id": _id(kind),
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": self.model,
        }
        if kind == "chat":
            choices = [
                {
                    "index": i,
                    "message": {
                        "role": "assistant",
                        "content": text,
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "reasoning": None,
                    },
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": stop,
                    "token_ids": None,
                    "routed_experts": None,
                }
                for i in range(n)
            ]
            return {
                **head,
                "choices": choices,
                "service_tier": None,
                "system_fingerprint": FINGERPRINT,
                "usage": usage,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "prompt_text": None,
                "kv_transfer_params": None,
                "ec_transfer_params": None,
                "metrics": None,
            }
        choices = [
            {
                "index": i,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": stop,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "routed_experts": None,
            }
            for i in range(n)
        ]
        return {
            **head,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": FINGERPRINT,
            "usage": usage,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }

    async def _stream(
        self,
        request: web.Request,
        kind: str,
        body: dict[str, Any],
        tokens: list[str],
        finish: str,
        stop: str | None,
        prompt_tokens: int,
        seq: Seq,
    ) -> web.StreamResponse:
        """The reply as SSE; its first token is out already, the others come from the engine."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        options = body.get("stream_options") or {}
        usage = bool(options.get("include_usage"))
        head = {
            "id": _id(kind),
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": self.model,
        }

        async def send(event: dict[str, Any]) -> None:
            await response.write(b"data: " + orjson.dumps(event) + b"\n\n")

        if kind == "chat":
            await send(
                {
                    **head,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                    "prompt_token_ids": None,
                    "prompt_text": None,
                }
            )
        for i, token in enumerate(tokens):
            if i:
                await seq.out.get()
            last = i == len(tokens) - 1
            if kind == "chat":
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": {"content": token},
                    "logprobs": None,
                    "finish_reason": finish if last else None,
                }
                if last:
                    choice["stop_reason"] = stop
                choice["token_ids"] = None
            else:
                choice = {
                    "index": 0,
                    "text": token,
                    "logprobs": None,
                    "finish_reason": finish if last else None,
                    "stop_reason": stop if last else None,
                    "prompt_token_ids": None,
                    "token_ids": None,
                }
            event = {**head, "choices": [choice]}
            if last and not usage:
                event["system_fingerprint"] = FINGERPRINT
            await send(event)
        if usage:
            generated = len(tokens) + (stop is not None)
            await send(
                {
                    **head,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "total_tokens": prompt_tokens + generated,
                        "completion_tokens": generated,
                    },
                    "system_fingerprint": FINGERPRINT,
                }
            )
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + os.urandom(8).hex()


def _linger0(transport: asyncio.BaseTransport) -> None:
    """Make the next close send a TCP reset instead of a FIN, as a crashed process's kernel does."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


def _reset_connection(request: web.Request) -> None:
    """What vLLM does on ``messages: []``: the client sees ``ECONNRESET`` and no reply at all."""
    transport = request.transport
    if transport is not None:
        _linger0(transport)
        transport.abort()


@web.middleware
async def _json_404(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """FastAPI's bodies for unknown paths and methods, as vLLM sends them."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _not_found()
    except web.HTTPMethodNotAllowed:
        return _json(405, {"detail": "Method Not Allowed"})


async def _uvicorn_headers(_: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "uvicorn"
    if response.status < 500:
        response.headers["Vary"] = "Origin"


def main(argv: list[str] | None = None) -> None:
    """One simulator in the foreground until SIGTERM or SIGINT, as a process of its own (what
    ``benchmarks/vllm_pool/local_smoke.py`` starts in place of a vLLM server)::

        python -m tests.vllm_sim --port 8001 [--model llama8b] [--pid-file /tmp/v1.pid]
    """
    import argparse
    import signal

    p = argparse.ArgumentParser(prog="python -m tests.vllm_sim", description=main.__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default=VllmSim.model)
    p.add_argument("--max-model-len", type=int, default=VllmSim.max_model_len)
    p.add_argument("--max-num-seqs", type=int, default=VllmSim.max_num_seqs)
    p.add_argument("--prefill-s-per-char", type=float, default=VllmSim.prefill_s_per_char)
    p.add_argument("--decode-s-per-token", type=float, default=VllmSim.decode_s_per_token)
    p.add_argument("--pid-file", type=Path, help="where to write this process's pid once it listens")
    args = p.parse_args(argv)
    # blocked before the server's thread starts (it inherits the mask), so only sigwait sees them
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    with VllmSim(
        model=args.model,
        port=args.port,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        prefill_s_per_char=args.prefill_s_per_char,
        decode_s_per_token=args.decode_s_per_token,
    ):
        if args.pid_file:
            args.pid_file.write_text(str(os.getpid()), encoding="utf-8")
        signal.sigwait(stop)


if __name__ == "__main__":
    main()
