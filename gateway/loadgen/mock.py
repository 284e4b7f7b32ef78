"""``interlock mock-upstream``: an OpenAI-compatible server that answers with made-up text at a set
pace, for benchmarks and demos without a GPU.

It speaks the protocol as vLLM does (the frames ``tests/vllm_sim.py`` reproduces from captures):
``POST /v1/chat/completions`` and ``/v1/completions``, streaming or not; a chat stream opens with
a ``{"role": "assistant", "content": ""}`` delta, each event carries ``chunk_tokens`` tokens, the
last one the ``finish_reason``, then (with ``stream_options.include_usage``) a usage chunk with
``"choices": []``, then ``data: [DONE]``. ``GET /v1/models`` lists the one model; ``GET /health``
answers 200. Errors are the OpenAI error body.

Pace: the first event ``ttft_ms`` after the request, then one event every ``chunk_tokens /
tokens_per_s`` seconds, each scheduled from the request's start so a late wake-up does not push
the rest back (``tokens_per_s`` 0: as fast as the socket takes them). A capacity, for demos of the
throughput cliff: at most ``max_running`` requests generate at once (the rest queue, so TTFT grows),
and ``total_tokens_per_s`` is shared by the running streams (each slows as more run). A request without
``max_tokens`` gets ``default_tokens`` tokens and ``finish_reason: stop``; one with it, that many
and ``length``, unless ``natural_tokens`` is set and smaller: then the reply "ends by itself" there
with ``stop`` (what the response cache stores: it keeps only finished answers).

Faults, each with a probability per generation request (drawn from a seeded generator, so N
requests get the same number of each fault every run):

- ``5xx``: a 500 with vLLM's engine error body;
- ``429``: a 429 with ``Retry-After: retry_after_s`` and OpenAI's rate-limit body;
- ``cut``: the connection is dropped halfway through the reply, no ``[DONE]``;
- ``stall``: the reply stops halfway for ``stall_s`` seconds, then goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

FAULTS = ("5xx", "429", "cut", "stall")
_WORDS = (" lorem", " ipsum", " dolor", " sit", " amet", ",", " consectetur", " adipiscing", " elit", ".")


@dataclass(slots=True)
class MockSettings:
    model: str = "mock"
    ttft_ms: float = 200.0
    tokens_per_s: float = 50.0
    chunk_tokens: int = 1
    usage: str = "requested"  # requested | always | never
    default_tokens: int = 16
    natural_tokens: int = 0  # > 0: replies end by themselves ("stop") at this length
    max_running: int = 0  # > 0: at most this many generate at once; the rest wait (TTFT grows)
    total_tokens_per_s: float = 0.0  # > 0: the streams share this pace (each gets its part)
    faults: dict[str, float] = field(default_factory=dict)
    retry_after_s: int = 1
    stall_s: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        if (
            self.ttft_ms < 0
            or self.tokens_per_s < 0
            or self.chunk_tokens < 1
            or self.default_tokens < 1
            or self.natural_tokens < 0
            or self.max_running < 0
            or self.total_tokens_per_s < 0
        ):
            raise ValueError("ttft and tokens/s must be >= 0, chunk and default tokens >= 1")
        if self.usage not in ("requested", "always", "never"):
            raise ValueError(f"usage must be requested, always or never, not {self.usage!r}")
        unknown = set(self.faults) - set(FAULTS)
        if unknown:
            raise ValueError(
                f"unknown fault(s) {', '.join(sorted(unknown))}: the faults are {', '.join(FAULTS)}"
            )
        if any(not 0 <= p <= 1 for p in self.faults.values()) or sum(self.faults.values()) > 1:
            raise ValueError("fault probabilities are between 0 and 1, and add up to at most 1")


def parse_faults(text: str | None) -> dict[str, float]:
    """``5xx=0.1,cut=0.05`` as a dict."""
    faults: dict[str, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, _, value = part.partition("=")
        try:
            faults[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--faults: {name.strip()} needs a probability, not {value!r}") from None
    return faults


def _error(
    status: int, message: str, type_: str, code: object, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


class MockUpstream:
    def __init__(self, settings: MockSettings) -> None:
        self.settings = settings
        self._rng = random.Random(settings.seed)
        self.served = 0
        self.running = 0
        self._slots = asyncio.Semaphore(settings.max_running) if settings.max_running else None
        self.faulted: dict[str, int] = dict.fromkeys(FAULTS, 0)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        return app

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _models(self, _: web.Request) -> web.Response:
        model = {
            "id": self.settings.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "interlock-mock",
        }
        return web.json_response({"object": "list", "data": [model]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    def _interval(self) -> float:
        """Seconds between two events of a stream now: its own pace, or its share of the total."""
        s = self.settings
        rates = [r for r in (s.tokens_per_s, s.total_tokens_per_s / max(1, self.running)) if r]
        return s.chunk_tokens / min(rates) if rates else 0.0

    def _decode_s(self, tokens: int) -> float:
        return (len(range(0, tokens, self.settings.chunk_tokens)) - 1) * self._interval()

    def _fault(self) -> str | None:
        draw, edge = self._rng.random(), 0.0
        for name in FAULTS:
            edge += self.settings.faults.get(name, 0.0)
            if draw < edge:
                self.faulted[name] += 1
                return name
        return None

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return _error(400, f"JSON decode error: {exc}", "BadRequestError", 400)
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object", "BadRequestError", 400)
        if chat and not (isinstance(body.get("messages"), list) and body["messages"]):
            return _error(400, "messages: a non-empty list is required", "BadRequestError", 400)
        if not chat and not isinstance(body.get("prompt"), str | list):
            return _error(400, "prompt: a string or a list is required", "BadRequestError", 400)
        model = body.get("model") or self.settings.model
        if model != self.settings.model:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError", 404)
        requested = body.get("max_tokens") or body.get("max_completion_tokens")
        if requested is not None and (not isinstance(requested, int) or requested < 1):
            return _error(400, "max_tokens must be a positive integer", "BadRequestError", 400)
        natural = self.settings.natural_tokens or (self.settings.default_tokens if requested is None else 0)
        if natural and (requested is None or natural <= requested):
            max_tokens, finish = natural, "stop"
        else:
            assert requested is not None  # without it, natural is default_tokens >= 1
            max_tokens, finish = requested, "length"
        fault = self._fault()
        if fault == "5xx":
            return _error(
                500,
                "EngineCore encountered an issue. See stack trace (above) for the root cause.",
                "InternalServerError",
                500,
            )
        if fault == "429":
            headers = {"Retry-After": str(self.settings.retry_after_s)}
            return _error(429, "Rate limit reached (mock).", "requests", "rate_limit_exceeded", headers)
        self.served += 1
        async with self._slots or contextlib.nullcontext():
            start = time.monotonic()  # a wait for a slot shows in the client's TTFT
            self.running += 1
            try:
                prompt_tokens = _count_prompt(body)
                tokens = [_WORDS[i % len(_WORDS)] for i in range(max_tokens)]
                if body.get("stream"):
                    options = body.get("stream_options") or {}
                    usage = self.settings.usage == "always" or (
                        self.settings.usage == "requested" and bool(options.get("include_usage"))
                    )
                    return await self._stream(
                        request, chat, model, tokens, finish, prompt_tokens, usage, fault, start
                    )
                await _until(start + self.settings.ttft_ms / 1000 + self._decode_s(len(tokens)))
                if fault == "stall":
                    await asyncio.sleep(self.settings.stall_s)
                if fault == "cut":
                    _drop(request)
                    return web.Response()
                return web.Response(
                    body=orjson.dumps(self._reply(chat, model, tokens, finish, prompt_tokens)),
                    content_type="application/json",
                )
            finally:
                self.running -= 1

    def _reply(
        self, chat: bool, model: str, tokens: list[str], finish: str, prompt_tokens: int
    ) -> dict[str, Any]:
        text = "".join(tokens)
        reply: dict[str, Any] = {
            "id": ("chatcmpl-" if chat else "cmpl-") + os.urandom(8).hex(),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
                if chat
                else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            ],
        }
        if self.settings.usage != "never":
            reply["usage"] = _usage(prompt_tokens, len(tokens))
        return reply

    async def _stream(
        self,
        request: web.Request,
        chat: bool,
        model: str,
        tokens: list[str],
        finish_reason: str,
        prompt_tokens: int,
        usage: bool,
        fault: str | None,
        start: float,
    ) -> web.StreamResponse:
        s = self.settings
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        head = orjson.dumps(
            {
                "id": ("chatcmpl-" if chat else "cmpl-") + os.urandom(8).hex(),
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()),
                "model": model,
            }
        )[:-1]
        choice = b',"choices":[{"index":0,' + (b'"delta":{"content":' if chat else b'"text":')
        tail = (b"}" if chat else b"") + b',"logprobs":null,"finish_reason":'
        chunks = [tokens[i : i + s.chunk_tokens] for i in range(0, len(tokens), s.chunk_tokens)]
        half = len(chunks) // 2
        await _until(start + s.ttft_ms / 1000)
        pending: list[bytes] = []
        if chat:
            pending.append(
                b"data: " + head + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
                b'"logprobs":null,"finish_reason":null}]}\n\n'
            )
        paced = bool(s.tokens_per_s or s.total_tokens_per_s)
        at = start + s.ttft_ms / 1000
        for i, chunk in enumerate(chunks):
            if i == half and fault in ("cut", "stall"):
                if pending:
                    await response.write(b"".join(pending))
                    pending = []
                if fault == "cut":
                    _drop(request)
                    return response
                await asyncio.sleep(s.stall_s)
            last = i == len(chunks) - 1
            finish = b'"' + finish_reason.encode() + b'"' if last else b"null"
            pending.append(
                b"data: " + head + choice + orjson.dumps("".join(chunk)) + tail + finish + b"}]}\n\n"
            )
            if paced:
                at += self._interval() if i else 0.0  # from the schedule, so late wake-ups do not add up
                await _until(at)
            if paced or len(pending) >= 16 or last:
                await response.write(b"".join(pending))
                pending = []
        if usage:
            event = {"choices": [], "usage": _usage(prompt_tokens, len(tokens))}
            await response.write(b"data: " + head + b"," + orjson.dumps(event)[1:] + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def _until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def _drop(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _count_prompt(body: dict[str, Any]) -> int:
    """Words stand in for tokens (no tokenizer here)."""
    if isinstance(body.get("messages"), list):
        return sum(len(str(m.get("content", "")).split()) for m in body["messages"] if isinstance(m, dict))
    prompt = body.get("prompt")
    return len(prompt.split()) if isinstance(prompt, str) else len(str(prompt).split())


def serve(settings: MockSettings, host: str, port: int) -> None:
    mock = MockUpstream(settings)
    print(f"interlock mock-upstream: model {settings.model!r} on http://{host}:{port}/v1", flush=True)
    web.run_app(
        mock.app(),
        host=host,
        port=port,
        print=None,
        access_log=None,
        handle_signals=True,
        shutdown_timeout=1.0,
        # a client that leaves ends its request here too, as vLLM aborts it: no writes to a
        # closed socket, no stall sleeping on for nobody
        handler_cancellation=True,
    )
