"""An OpenAI-compatible upstream that counts: each reply has a random number of tokens, at most
the request's ``max_tokens``, a usage chunk on streams that ask for it (``stream_options``), and
the tokens of every reply it sent whole are added up, so a test can hold a limit to real tokens.

Model ``hold`` streams one token and then waits until ``release()`` (or 60 s)."""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from tests.fakes import free_port, serve_app


def _chunk(model: str, delta: dict[str, object], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-usage",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


@dataclass
class UsageUpstream:
    #: the pause between two tokens of a stream
    token_s: float = 0.002
    seed: int = 1
    port: int = field(default_factory=free_port)
    #: the bodies it was sent
    requests: list[dict[str, object]] = field(default_factory=list)
    #: prompt + completion tokens of every reply that went out whole
    tokens: int = 0
    replies: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._release: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def release(self) -> None:
        if self._loop is not None and self._release is not None:
            self._loop.call_soon_threadsafe(self._release.set)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._release is None:
            self._loop, self._release = asyncio.get_running_loop(), asyncio.Event()
        body = await request.json()
        self.requests.append(body)
        model = str(body.get("model", "m"))
        cap = int(body.get("max_tokens") or 16)
        completion = self._rng.randint(1, cap)
        prompt = len(orjson.dumps(body.get("messages", []))) // 8  # fewer than the gateway's estimate
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        if not body.get("stream"):
            self._count(prompt + completion)
            return web.json_response(
                {
                    "id": "chatcmpl-usage",
                    "object": "chat.completion",
                    "created": 1,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "x" * completion},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_chunk(model, {"role": "assistant", "content": ""}))
        if model == "hold":
            await response.write(_chunk(model, {"content": "x"}))
            try:
                await asyncio.wait_for(self._release.wait(), 60)
            except TimeoutError:
                pass
        for _ in range(completion):
            await response.write(_chunk(model, {"content": "x"}))
            if self.token_s:
                await asyncio.sleep(self.token_s)
        await response.write(_chunk(model, {}, "stop"))
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            tail = {"id": "chatcmpl-usage", "object": "chat.completion.chunk", "created": 1, "model": model}
            await response.write(b"data: " + orjson.dumps({**tail, "choices": [], "usage": usage}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        self._count(prompt + completion)
        return response

    def _count(self, tokens: int) -> None:
        with self._lock:
            self.tokens += tokens
            self.replies += 1

    def __enter__(self) -> UsageUpstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        self._stop = serve_app(app, self.port, shutdown_timeout=1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self._stop()
