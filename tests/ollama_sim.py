"""A SIMULATOR of Ollama's native HTTP API, for tests. It is not Ollama.

No Ollama binary is available here, so this small aiohttp server imitates the parts of
Ollama's native API that ``backends.ollama`` uses, written from its API documentation
(https://github.com/ollama/ollama/blob/main/docs/api.md, checked against Ollama's source): the paths,
field names, NDJSON framing, status codes and error bodies follow that reference; the
"model" is a deterministic function of the input, so tests can assert exact text.

Endpoints: ``GET /api/tags``, ``GET /api/ps``, ``GET /api/version``, ``GET /``,
``POST /api/chat``, ``POST /api/generate``, ``POST /api/embed``.

The fake model:
    chat        replies ``You said: <last user text>``; with ``tools`` and a user turn last it
                calls the first tool with ``{"text": <last user text>}``; after a ``tool``
                message it replies ``Tool said: <its content>``; with ``think`` it sends
                ``message.thinking`` deltas (``Thinking about it.``) first; with ``format`` the
                reply is the JSON object ``{"you_said": <text>}``.
    generate    replies ``Continued: <prompt>`` (plus `` then <suffix>`` with a suffix).
    tokens      one token per whitespace-separated word, its leading spaces attached
                (``count_tokens``); a prompt's count is the words of every message (or prompt).
    options     ``stop`` cuts the reply before the first stop string (``done_reason: stop``);
                ``num_predict`` caps the tokens (``done_reason: length``); option types are
                checked as Ollama does (wrong type → 500 ``option "x" must be of type ...``).
    embed       ``embed_vector(text, dimensions)``: 16 numbers from the text's SHA-256, L2-normalised.

Markers in the last user text (or the prompt) pick a failure:
    [cut]       streams two chunks, then drops the connection (no ``done: true``)
    [error]     streams two chunks, then ``{"error": ...}`` and ends, status 200 (as Ollama does)
    [nodone]    streams two chunks, then ends the response cleanly without a ``done: true`` line
    [fail500]   HTTP 500 ``{"error": ...}`` before anything is streamed
    [endless]   streams a token every 20 ms until the client goes away

Switches on the object: ``pulled`` (models /api/tags lists; others get Ollama's 404),
``embedding_only`` (models that refuse chat/generate with 400), ``load_s`` (loading a model
that is not in memory takes this long and the request waits, as in Ollama: there is no
loading status), ``busy`` (every inference request gets Ollama's queue-full 503, with
``Retry-After: busy_retry_after`` if set: Ollama sends none, a proxy in front might),
``legacy_not_found`` (the older 404 wording). It records every request (``requests``) and
the requests whose client went away mid-stream (``disconnects``).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from tests.fakes import free_port, serve_app

VERSION = "0.12.6"
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
_WORD = re.compile(r"\s*\S+")

#: option -> JSON type Ollama requires (a subset of api.Options, enough to catch mapping mistakes)
_OPTION_TYPES: dict[str, str] = {
    "temperature": "float",
    "top_p": "float",
    "min_p": "float",
    "typical_p": "float",
    "presence_penalty": "float",
    "frequency_penalty": "float",
    "repeat_penalty": "float",
    "top_k": "integer",
    "seed": "integer",
    "num_predict": "integer",
    "num_ctx": "integer",
    "repeat_last_n": "integer",
    "num_keep": "integer",
    "num_batch": "integer",
    "stop": "[]string",
}


def normalise(name: str) -> str:
    name = name.strip().lower()
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


def tokens(text: str) -> list[str]:
    return _WORD.findall(text)


def count_tokens(*texts: str) -> int:
    return sum(len(tokens(t)) for t in texts)


def embed_vector(text: str, dimensions: int | None = None) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    values = [(b - 127.5) / 127.5 for b in digest[:16]]
    if dimensions is not None:
        values = values[:dimensions]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def chat_reply(text: str) -> str:
    return f"You said: {text}"


def generate_reply(prompt: str, suffix: str | None = None) -> str:
    return f"Continued: {prompt}" + (f" then {suffix}" if suffix else "")


def _unconvertible_schema(fmt: Any) -> bool:
    """A ``format`` schema Ollama's grammar converter rejects. The real converter fails on more
    (unsupported keywords, refs it cannot resolve); two cases stand in for them here: a schema
    that constrains nothing (``{"$schema": ...}`` alone, as zod-to-json-schema emits for zod 4)
    and a ``$ref`` to another document."""
    if not isinstance(fmt, dict):
        return False
    if not set(fmt) - {"$schema", "title", "description"}:
        return True
    ref = fmt.get("$ref")
    return isinstance(ref, str) and not ref.startswith("#")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Reject(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class OllamaSim:
    pulled: list[str] = field(default_factory=lambda: ["llama3.2:3b", "all-minilm:latest"])
    embedding_only: list[str] = field(default_factory=lambda: ["all-minilm:latest"])
    load_s: float = 0.0
    busy: bool = False
    busy_retry_after: str | None = None
    legacy_not_found: bool = False
    port: int = field(default_factory=free_port)
    #: (path, JSON body) of every POST, in arrival order
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: the last user text (or prompt) of each stream whose client went away
    disconnects: list[str] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)
    #: models in memory (normalised names)
    loaded: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def bodies(self, path: str) -> list[dict[str, Any]]:
        """Requests to ``path`` other than load requests (empty messages / prompt / input)."""
        return [
            b
            for p, b in self.requests
            if p == path and (b.get("messages") or b.get("prompt") or b.get("input"))
        ]

    def last(self, path: str) -> dict[str, Any]:
        return self.bodies(path)[-1]

    # -- helpers ------------------------------------------------------------------------------

    def _model(self, body: dict[str, Any], what: str) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            if what == "chat":
                raise _Reject(400, "model is required")
            raise _Reject(404, "model '' not found")
        name = normalise(model)
        if name not in {normalise(m) for m in self.pulled}:
            if self.legacy_not_found:
                raise _Reject(404, f'model "{model}" not found, try pulling it first')
            raise _Reject(404, f"model '{model}' not found")
        if what in ("chat", "generate") and name in {normalise(m) for m in self.embedding_only}:
            raise _Reject(400, f'"{model}" does not support {what}')
        return name

    @staticmethod
    def _options(body: dict[str, Any]) -> dict[str, Any]:
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise _Reject(400, "json: cannot unmarshal options into Go struct field of type map[string]any")
        for key, value in options.items():
            kind = _OPTION_TYPES.get(key)
            ok = {
                None: True,
                "float": type(value) in (int, float),
                "integer": type(value) is int or (type(value) is float and value.is_integer()),
                "[]string": isinstance(value, list) and all(isinstance(s, str) for s in value),
            }[kind]
            if not ok:
                raise _Reject(
                    500,
                    f'option "{key}" must be of type {kind.strip("[]")}'
                    + (" array" if kind == "[]string" else ""),
                )
        return options

    async def _load(self, name: str) -> int:
        """Wait for the model to be in memory; returns load_duration in ns (Ollama's meaning)."""
        started = time.monotonic_ns()
        if name not in self.loaded:
            await asyncio.sleep(self.load_s)
            self.loaded.add(name)
        return max(1, time.monotonic_ns() - started)

    @staticmethod
    def _cut(text: str, options: dict[str, Any]) -> tuple[list[str], str]:
        reason = "stop"
        for stop in options.get("stop") or ():
            at = text.find(stop) if stop else -1
            if at >= 0:
                text = text[:at]
        words = tokens(text)
        limit = options.get("num_predict")
        if isinstance(limit, int | float) and limit >= 0 and len(words) > limit:
            words, reason = words[: int(limit)], "length"
        return words, reason

    @staticmethod
    def _metrics(load_ns: int, prompt_n: int, eval_n: int) -> dict[str, Any]:
        metrics = {
            "total_duration": load_ns + 1_000_000 * (prompt_n + eval_n + 1),
            "load_duration": load_ns,
            "prompt_eval_count": prompt_n,
            "prompt_eval_duration": 1_000_000 * prompt_n,
            "eval_count": eval_n,
            "eval_duration": 1_000_000 * eval_n,
        }
        return {k: v for k, v in metrics.items() if v}  # zero-valued metrics are omitted

    # -- handlers -----------------------------------------------------------------------------

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if not raw:
            raise _Reject(400, "missing request body")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _Reject(400, f"invalid character in JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _Reject(400, "json: cannot unmarshal array into Go value of type api.ChatRequest")
        self.requests.append((request.path, body))
        return body

    async def tags(self, _: web.Request) -> web.Response:
        models = [
            {
                "name": normalise(m),
                "model": normalise(m),
                "modified_at": "2025-01-01T00:00:00Z",
                "size": 2019393189,
                "digest": hashlib.sha256(m.encode()).hexdigest(),
                "details": {
                    "parent_model": "",
                    "format": "gguf",
                    "family": "llama",
                    "families": ["llama"],
                    "parameter_size": "3.2B",
                    "quantization_level": "Q4_K_M",
                },
            }
            for m in self.pulled
        ]
        return web.json_response({"models": models})

    async def ps(self, _: web.Request) -> web.Response:
        return web.json_response(
            {
                "models": [
                    {
                        "name": m,
                        "model": m,
                        "size": 2019393189,
                        "expires_at": "2099-01-01T00:00:00Z",
                        "size_vram": 2019393189,
                    }
                    for m in sorted(self.loaded)
                ]
            }
        )

    async def version(self, _: web.Request) -> web.Response:
        return web.json_response({"version": VERSION})

    async def root(self, _: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, "chat")

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, "generate")

    async def embed(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._json_body(request)
            name = self._model(body, "embed")
            self._options(body)
            value = body.get("input")
            inputs = [value] if isinstance(value, str) else value if isinstance(value, list) else None
            if inputs is None or not all(isinstance(v, str) for v in inputs):
                raise _Reject(400, "invalid input type")
            if self.busy and inputs:
                raise _Reject(503, BUSY_MESSAGE, self._busy_headers())
        except _Reject as exc:
            return web.json_response({"error": exc.message}, status=exc.status, headers=exc.headers)
        load_ns = await self._load(name)
        dimensions = body.get("dimensions")
        reply: dict[str, Any] = {
            "model": body["model"],
            "embeddings": [embed_vector(t, dimensions) for t in inputs],
        }
        if inputs:
            reply.update(
                total_duration=load_ns + 1_000_000,
                load_duration=load_ns,
                prompt_eval_count=count_tokens(*inputs),
            )
        return web.json_response(reply)

    def _busy_headers(self) -> dict[str, str]:
        return {"Retry-After": self.busy_retry_after} if self.busy_retry_after else {}

    async def _inference(self, request: web.Request, what: str) -> web.StreamResponse:
        try:
            body = await self._json_body(request)
            name = self._model(body, what)
            options = self._options(body)
            if what == "chat":
                messages = body.get("messages")
                if not isinstance(messages, list):
                    raise _Reject(400, "json: cannot unmarshal messages")
                load_only = not messages
            else:
                prompt = body.get("prompt")
                load_only = not prompt
                if body.get("raw") and (body.get("template") or body.get("system") or body.get("context")):
                    raise _Reject(400, "raw mode does not support template, system, or context")
            if _unconvertible_schema(body.get("format")):
                # llama.SchemaToGrammar gives up; Ollama answers from its generic error path
                raise _Reject(500, "invalid JSON schema in format")
            if self.busy and not load_only:
                raise _Reject(503, BUSY_MESSAGE, self._busy_headers())
        except _Reject as exc:
            return web.json_response({"error": exc.message}, status=exc.status, headers=exc.headers)
        load_ns = await self._load(name)
        model = body["model"]
        key = "message" if what == "chat" else "response"
        if load_only:  # the documented load (or unload) request
            reason = "unload" if body.get("keep_alive") == 0 else "load"
            empty: Any = {"role": "assistant", "content": ""} if what == "chat" else ""
            return web.json_response(
                {"model": model, "created_at": _now(), key: empty, "done": True, "done_reason": reason}
            )
        thinking: list[str] = []
        calls: list[dict[str, Any]] = []
        if what == "chat":
            last = messages[-1]
            user_texts = [m.get("content") or "" for m in messages if m.get("role") == "user"]
            trigger = user_texts[-1] if user_texts else ""
            prompt_n = count_tokens(*(m.get("content") or "" for m in messages))
            if body.get("think"):
                thinking = tokens("Thinking about it.")
            tools = body.get("tools") or []
            if last.get("role") == "tool":
                text = f"Tool said: {last.get('content') or ''}"
            elif tools and last.get("role") == "user":
                fn = tools[0]["function"]["name"]
                calls = [
                    {
                        "id": "call_sim0001",
                        "function": {"index": 0, "name": fn, "arguments": {"text": trigger}},
                    }
                ]
                text = ""
            elif body.get("format") is not None:
                text = orjson.dumps({"you_said": trigger}).decode()
            else:
                text = chat_reply(trigger)
        else:
            trigger = prompt
            prompt_n = count_tokens(prompt, body.get("suffix") or "")
            text = generate_reply(prompt, body.get("suffix"))
        words, reason = self._cut(text, options)
        eval_n = len(thinking) + len(words) + len(calls)
        if "[fail500]" in trigger:
            return web.json_response(
                {"error": "llama runner process has terminated: exit status 2"}, status=500
            )
        if body.get("stream") is False:
            if "[cut]" in trigger:
                assert request.transport is not None
                request.transport.close()
                return web.Response()
            if "[error]" in trigger:
                return web.json_response({"error": "simulated runner failure"}, status=500)
            full: Any
            if what == "chat":
                full = {"role": "assistant", "content": "".join(words)}
                if thinking:
                    full["thinking"] = "".join(thinking)
                if calls:
                    full["tool_calls"] = calls
            else:
                full = "".join(words)
            return web.json_response(
                {
                    "model": model,
                    "created_at": _now(),
                    key: full,
                    "done": True,
                    "done_reason": reason,
                    **self._metrics(load_ns, prompt_n, eval_n),
                }
            )
        return await self._stream(
            request,
            what,
            model,
            trigger,
            thinking,
            words,
            calls,
            reason,
            self._metrics(load_ns, prompt_n, eval_n),
        )

    async def _stream(
        self,
        request: web.Request,
        what: str,
        model: str,
        trigger: str,
        thinking: list[str],
        words: list[str],
        calls: list[dict[str, Any]],
        reason: str,
        metrics: dict[str, Any],
    ) -> web.StreamResponse:
        def line(delta: dict[str, Any] | str, done: bool = False, **extra: Any) -> bytes:
            if what == "chat":
                assert isinstance(delta, dict)
                obj: dict[str, Any] = {
                    "model": model,
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": "", **delta},
                    "done": done,
                }
            else:
                obj = {"model": model, "created_at": _now(), "response": delta, "done": done}
            return orjson.dumps({**obj, **extra}) + b"\n"

        def piece(word: str) -> dict[str, Any] | str:
            return {"content": word} if what == "chat" else word

        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        try:
            for word in thinking:
                await response.write(line({"thinking": word}) if what == "chat" else line("", thinking=word))
            if "[endless]" in trigger:
                for i in range(5000):
                    await asyncio.sleep(0.02)
                    await response.write(line(piece(f" more{i}")))
            if "[cut]" in trigger or "[error]" in trigger or "[nodone]" in trigger:
                for word in words[:2]:
                    await response.write(line(piece(word)))
                if "[error]" in trigger:
                    await response.write(orjson.dumps({"error": "simulated runner failure"}) + b"\n")
                if "[error]" in trigger or "[nodone]" in trigger:
                    await response.write_eof()
                    return response
                await asyncio.sleep(0.05)
                assert request.transport is not None
                request.transport.close()
                return response
            for word in words:
                await response.write(line(piece(word)))
            for call in calls:  # each tool call whole, in a done:false chunk
                await response.write(line({"tool_calls": [call]}))
            await response.write(line(piece(""), done=True, done_reason=reason, **metrics))
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects.append(trigger)
            self.disconnected.set()
            raise
        return response

    # -- running ------------------------------------------------------------------------------

    def __enter__(self) -> OllamaSim:
        app = web.Application()
        app.router.add_get("/", self.root)
        app.router.add_get("/api/tags", self.tags)
        app.router.add_get("/api/ps", self.ps)
        app.router.add_get("/api/version", self.version)
        app.router.add_post("/api/chat", self.chat)
        app.router.add_post("/api/generate", self.generate)
        app.router.add_post("/api/embed", self.embed)
        self._stop = serve_app(app, self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()
