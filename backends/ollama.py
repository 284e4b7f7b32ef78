"""``kind: ollama``: an Ollama server through its native API (/api/chat, /api/generate, /api/embed).

Written from Ollama's API reference (``/work/shared/reference/ollama-api.md``, checked
against Ollama's source); the section numbers below are that document's.

What follows the reference
    * chat → ``POST /api/chat`` (§1): roles (``developer`` → ``system``, legacy ``function`` →
      ``tool``), text content parts joined, ``image_url`` parts given as base64 ``data:`` URLs →
      ``images`` (raw base64), ``tools`` passed through (same shape), assistant ``tool_calls``
      with their JSON-string arguments parsed into objects, tool results carry ``tool_name``
      looked up from the call id. ``response_format`` ``json_object`` → ``format: "json"``,
      ``json_schema`` → ``format: <schema>``; ``reasoning_effort`` → ``think`` (``none`` → false).
      Replies: ``message.content`` deltas → content deltas, ``message.thinking`` →
      ``reasoning_content`` (vLLM's field name), whole tool calls → one ``tool_calls`` delta each
      (arguments re-encoded as JSON strings, ``finish_reason: "tool_calls"``).
    * text completions → ``POST /api/generate`` (§2) with ``raw: true`` (an OpenAI completion
      continues the text as given, as vLLM and the llamacpp backend do), except with ``suffix``,
      which needs the model's template to build the fill-in-the-middle prompt (``raw: false``).
    * embeddings → ``POST /api/embed`` (§3): ``input`` string or list of strings, ``dimensions``;
      ``encoding_format: "base64"`` (the openai SDK's default) is encoded here (little-endian float32).
    * options (§5): ``temperature``, ``top_p``, ``seed``, ``presence_penalty``,
      ``frequency_penalty`` keep their names; ``stop`` → list; ``max_completion_tokens`` /
      ``max_tokens`` → ``num_predict``; ``num_ctx`` from the config; vLLM-style extras ``top_k``,
      ``min_p``, ``repeat_penalty`` pass through (type-checked here: a wrong type is a 500 from
      Ollama, which would count against the breaker). Fields a client leaves out are not sent, so
      the Modelfile's defaults apply (Ollama's /v1 layer sends temperature/top_p 1.0 instead).
      ``keep_alive`` from the config goes top-level.
    * streams (§1, §6): NDJSON is translated line by line as it arrives; the final ``done: true``
      line gives ``finish_reason`` (``done_reason``: ``length`` → ``length``; ``stop``, ``load``,
      ``unload`` → ``stop``) and usage (``prompt_eval_count`` / ``eval_count``; zero values are
      omitted by Ollama and read as 0). An ``{"error": ...}`` line raises ``BackendError``; a stream
      that ends without ``done: true`` raises ``BackendUnavailable``. Closing the iterator closes
      the connection, which is how Ollama learns the client left (it then stops generating).
    * errors (§6, body ``{"error": "<msg>"}``): 404 ``model ... not found`` (both wordings) →
      ``ModelNotPulled``; 400 → ``InvalidRequest`` (``does not support chat|generate|embed`` →
      ``UnsupportedEndpoint``); 503 (queue full) and 429 → ``BackendOverloaded``, with
      ``Retry-After`` only when one was sent (Ollama sends none; a proxy might: none is invented,
      since the gateway's breaker opens at once on a Retry-After); other 5xx →
      ``UpstreamHTTPError`` (retryable, the client sees 502); connect failures and timeouts →
      ``BackendUnavailable`` / ``BackendTimeout`` (the shared
      ``backends.http`` plumbing, including its one retry on a stale keep-alive connection).
    * loading (§1 "Load and unload", §6 "Loading"): Ollama has no loading status; a request for a
      model that is not in memory just waits while it loads. So ``start()`` preloads the model
      in the background with the documented load request (``/api/chat`` with ``messages: []``,
      or ``/api/embed`` with ``input: []`` for embedding-only models), using the configured
      ``keep_alive`` and ``num_ctx`` (a different ``num_ctx`` would reload it). While that load
      is in flight, ``health()`` is not ok (readiness waits) and requests fail fast with
      ``BackendOverloaded`` (503, ``Retry-After: 2``), so the router can use another backend
      instead of waiting (the breaker opens on that Retry-After and skips this backend for its
      cool-down). A model Ollama unloads later (``keep_alive`` expired) is reloaded by the next
      request inside Ollama: ``timeouts.first_token`` must cover that load.
    * health (§4): ``GET /api/tags``; the configured model must be listed (names compared
      normalised: ``llama3.2`` == ``llama3.2:latest``, case-insensitive).
    * Ollama's own durations are logged at debug level per request (and a cold load at info);
      the gateway measures TTFT itself.

Why ``ModelNotPulled`` is a 404 and not retryable: the model exists in the gateway's config but
not on the Ollama server, which is an operator's configuration problem, not an outage, so the
breaker must not count it (``retryable = False``; note the router then does not try another
backend either). 404 ``not_found`` matches what Ollama and OpenAI answer for a missing model and
what the openai SDK raises as ``NotFoundError``, which clients already treat as "do not retry";
its ``code`` (``model_not_pulled``) and message tell it apart from the gateway's own unknown-model
404 (``model_not_found``).

Not supported (a clear 400 naming the parameter): ``n`` > 1, ``logprobs`` / ``top_logprobs``,
``logit_bias``, ``echo``, ``best_of`` > 1, ``tool_choice`` other than ``auto`` / ``none``
(``none`` drops the tools), image URLs that are not base64 ``data:`` URLs and other non-text
content parts, several prompts in one completion request, token-id prompts and embedding inputs.
Ignored: ``user``, ``parallel_tool_calls``, ``stream_options`` other than ``include_usage``.
Not used: Ollama's ``/v1`` OpenAI layer, ``/api/embeddings`` (legacy), ``context``,
``template``/``system`` overrides. Usage caveat: Ollama's ``prompt_eval_count`` counts the prompt
tokens it evaluated, which can be fewer than the prompt when its prompt cache was reused.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import struct
import time
import uuid
from collections import deque
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import orjson
from pydantic import Field, SecretStr, field_validator

from backends.base import BackendConfig, BackendRequest, BackendResponse, Health, Load, Resources, Usage
from backends.errors import (
    BackendError,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    InterlockError,
    InvalidRequest,
    UnsupportedEndpoint,
    UpstreamHTTPError,
)
from backends.http import OpenAICompatibleUpstream, Timeouts, _error_dict, _retry_after
from backends.openai import TimeoutsConfig

log = logging.getLogger("interlock.backends.ollama")

_DONE = b"data: [DONE]\n\n"
_MAX_ERROR_BODY = 64 * 1024
_MAX_MESSAGE = 1000
#: one NDJSON line may not grow beyond this (a tool call with huge arguments is still far below)
_MAX_LINE = 16 * 1024 * 1024
#: Retry-After while the model is being preloaded
_LOADING_RETRY_AFTER_S = 2.0
#: GET /api/tags must answer within this (the health monitor bounds it too)
_HEALTH_TIMEOUT_S = 3.0
#: a Go ``time.ParseDuration`` string, which is what Ollama accepts for a string keep_alive
_GO_DURATION = re.compile(r"^[-+]?(0|((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+)$")
_NOT_FOUND = re.compile(r"^model .* not found")
#: a 400 ``... does not support <word>`` names the request field that asked for it
_CAPABILITY_PARAMS = (("tools", "tools"), ("insert", "suffix"), ("thinking", "reasoning_effort"))


class OllamaConfig(BackendConfig):
    """YAML: ``{kind: ollama, url: http://localhost:11434, model: llama3.2:3b, keep_alive: 10m}``."""

    kind: Literal["ollama"]
    #: the server's base URL, without ``/api`` or ``/v1``
    url: str
    #: the Ollama model name, as ``ollama pull`` takes it
    model: str = Field(min_length=1)
    #: seconds, or a duration string ("5m", "1h"); negative keeps the model loaded; None: Ollama's default
    keep_alive: str | int | None = None
    #: context size Ollama loads the model with; None: the Modelfile's or Ollama's default
    num_ctx: int | None = Field(default=None, ge=1)
    #: load the model when the gateway starts (requests fail fast with 503 while it loads)
    preload: bool = True
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http:// or https:// URL")
        value = value.rstrip("/")
        if value.endswith(("/v1", "/api")):
            raise ValueError("must be the Ollama server's base URL, without /api or /v1 "
                             "(for Ollama's OpenAI-compatible /v1 API use kind: openai)")
        return value

    @field_validator("keep_alive")
    @classmethod
    def _duration(cls, value: str | int | None) -> str | int | None:
        if isinstance(value, str) and not _GO_DURATION.match(value.strip()):
            raise ValueError('must be a number of seconds or a duration such as "30s", "5m", "1h"')
        return value.strip() if isinstance(value, str) else value


class ModelNotPulled(InvalidRequest):
    """The configured model is not on the Ollama server: a configuration problem, never retried."""

    status = 404
    code = "model_not_pulled"


def normalise_model_name(name: str) -> str:
    """The form Ollama compares names in: lower case, ``:latest`` when no tag, default registry dropped."""
    name = name.strip().lower().split("@", 1)[0]
    name = name.removeprefix("registry.ollama.ai/").removeprefix("library/")
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


class OllamaBackend:
    kind = "ollama"

    def __init__(self, name: str, config: OllamaConfig, resources: Resources) -> None:
        self.name = name
        self.config = config
        self._http = resources.http
        self._extra_headers = {k: v.get_secret_value() for k, v in config.headers.items()}
        self._headers = {"content-type": "application/json", **self._extra_headers}
        parts = urlsplit(config.url)
        #: host[:port] without credentials: what health reasons may name
        self._host = parts.hostname or "?"
        if parts.port:
            self._host = f"{self._host}:{parts.port}"
        self._secrets = tuple(s for s in (config.url, parts.netloc, *(
            v for v in self._extra_headers.values() if len(v) >= 8)) if s)
        t = config.timeouts
        self._upstream = self._make_upstream(Timeouts(t.connect, t.first_token, t.total))
        self._in_flight = 0
        self._preload: asyncio.Task[None] | None = None

    def _make_upstream(self, timeouts: Timeouts) -> OpenAICompatibleUpstream:
        # Only its POST (timeouts, one retry on a stale pooled connection, failure mapping) and its
        # redaction are used: Ollama speaks NDJSON, not SSE, so replies are read here.
        return OpenAICompatibleUpstream(http=self._http, base_url=self.config.url, headers=self._headers,
                                        timeouts=timeouts, secrets=self._secrets)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.config.preload and self._preload is None:
            self._preload = asyncio.create_task(self._load_model(), name=f"ollama-preload-{self.name}")

    async def close(self) -> None:
        task, self._preload = self._preload, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})  # its own end is not an error here; our own cancellation still is

    def _loading(self) -> bool:
        return self._preload is not None and not self._preload.done()

    async def _load_model(self) -> None:
        """Ollama's documented load request; the whole load may take up to ``timeouts.total``."""
        t = self.config.timeouts
        upstream = self._make_upstream(Timeouts(t.connect, t.total, t.total))
        started = time.monotonic()
        body = {"model": self.config.model, **self._common()}
        try:
            try:
                await self._call(upstream, "/api/chat", {**body, "messages": []}, f"preload-{self.name}")
            except UnsupportedEndpoint:  # an embedding-only model: load it the way embeddings do
                await self._call(upstream, "/api/embed", {**body, "input": []}, f"preload-{self.name}")
        except Exception as exc:  # requests will load it (or say why not); never a loud dead task
            reason = exc.message if isinstance(exc, InterlockError) else repr(exc)
            log.warning("%s: could not preload model %s: %s", self.name, self.config.model, reason)
            return
        log.info("%s: ollama loaded model %s in %.1fs", self.name, self.config.model,
                 time.monotonic() - started)

    # -- requests -------------------------------------------------------------------------------

    def _refuse_while_loading(self) -> None:
        if self._loading():
            raise BackendOverloaded(
                f"the model {self.config.model} is still loading into Ollama; retry shortly",
                retry_after=_LOADING_RETRY_AFTER_S)

    async def complete(self, request: BackendRequest) -> BackendResponse:
        path, payload = self._payload(request, stream=False)  # a bad request is a 400 even while loading
        self._refuse_while_loading()
        self._in_flight += 1
        try:
            data = await self._call(self._upstream, path, payload, request.request_id)
        finally:
            self._in_flight -= 1
        model = _client_model(request)
        if request.endpoint == "embeddings":
            return _embeddings_reply(data, model, request.body.get("encoding_format"))
        shape = _Shape(request.endpoint == "chat", model)
        body = shape.body(data)
        self._log_timings(request.request_id, data)
        return BackendResponse(body=body, usage=_usage(data))

    async def stream(self, request: BackendRequest) -> _NdjsonRelay:
        path, payload = self._payload(request, stream=True)
        self._refuse_while_loading()
        options = request.body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        shape = _Shape(request.endpoint == "chat", _client_model(request), include_usage=include_usage)
        self._in_flight += 1
        try:
            response = await self._post(self._upstream, path, payload, request.request_id, stream=True)
        except BaseException:
            self._in_flight -= 1
            raise
        relay = _NdjsonRelay(self, response, shape, request.request_id)
        try:
            async with asyncio.timeout(self.config.timeouts.first_token):
                await relay.prime()
        except TimeoutError:
            await relay.aclose()
            raise BackendTimeout(f"no first token from ollama within "
                                 f"{self.config.timeouts.first_token:g}s") from None
        except BaseException:
            await relay.aclose()
            raise
        return relay

    def _payload(self, request: BackendRequest, *, stream: bool) -> tuple[str, dict[str, Any]]:
        body = request.body
        if request.endpoint == "embeddings":
            return "/api/embed", self._embed_payload(body)
        _refuse_unsupported(body, request.endpoint)
        payload: dict[str, Any] = {"model": self.config.model, "stream": stream}
        if request.endpoint == "chat":
            payload["messages"] = _messages(body.get("messages"))
            tools = body.get("tools")
            if tools and body.get("tool_choice") != "none":
                payload["tools"] = tools
            fmt = _format(body.get("response_format"))
            if fmt is not None:
                payload["format"] = fmt
            think = _think(body.get("reasoning_effort"))
            if think is not None:
                payload["think"] = think
            path = "/api/chat"
        else:
            payload["prompt"] = _prompt(body.get("prompt"))
            suffix = body.get("suffix")
            if suffix:
                payload["suffix"] = suffix
            payload["raw"] = not suffix
            path = "/api/generate"
        options = {**_sampling(body, request.endpoint), **self._load_options()}
        if options:
            payload["options"] = options
        if self.config.keep_alive is not None:
            payload["keep_alive"] = self.config.keep_alive
        return path, payload

    def _embed_payload(self, body: dict[str, Any]) -> dict[str, Any]:
        value = body.get("input")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise InvalidRequest("token-id inputs are not supported by the ollama backend; send text",
                                 param="input")
        if not isinstance(value, str | list):
            raise InvalidRequest("input must be a string or a list of strings", param="input")
        payload: dict[str, Any] = {"model": self.config.model, "input": value, **self._common()}
        if body.get("dimensions") is not None:
            payload["dimensions"] = body["dimensions"]
        return payload

    def _load_options(self) -> dict[str, Any]:
        return {"num_ctx": self.config.num_ctx} if self.config.num_ctx is not None else {}

    def _common(self) -> dict[str, Any]:
        """What every request carries so that Ollama keeps (not reloads) the same model instance."""
        out: dict[str, Any] = {}
        if self._load_options():
            out["options"] = self._load_options()
        if self.config.keep_alive is not None:
            out["keep_alive"] = self.config.keep_alive
        return out

    # -- HTTP -----------------------------------------------------------------------------------

    async def _post(self, upstream: OpenAICompatibleUpstream, path: str, payload: dict[str, Any],
                    request_id: str, *, stream: bool) -> aiohttp.ClientResponse:
        """POST and return the response once its status is known good; every failure is mapped."""
        response = await upstream._send(path, orjson.dumps(payload), request_id)
        if response.status >= 400:
            try:
                raise await self._error(response, path)
            finally:
                response.release()
        ctype = response.content_type
        if ctype not in ("application/json", "application/x-ndjson"):
            response.close()
            raise BackendUnavailable(f"ollama answered {path} with {ctype or 'no content type'}, "
                                     f"not {'NDJSON' if stream else 'JSON'}")
        return response

    async def _call(self, upstream: OpenAICompatibleUpstream, path: str, payload: dict[str, Any],
                    request_id: str) -> dict[str, Any]:
        """A non-streamed call: the reply's JSON object."""
        response = await self._post(upstream, path, payload, request_id, stream=False)
        try:
            raw = await response.read()
        except TimeoutError:
            raise BackendTimeout(f"ollama did not finish within {upstream.timeouts.total:g}s") from None
        except aiohttp.ClientError as exc:
            raise upstream._unavailable(exc) from None
        finally:
            response.release()
        return self._parse(raw)

    def _parse(self, raw: bytes) -> dict[str, Any]:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            raise BackendUnavailable("ollama sent a line that is not a JSON object")
        error = data.get("error")
        if error is not None:
            raise BackendError(f"ollama reported an error: {self._redact(str(error))}")
        return data

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text[:_MAX_MESSAGE]

    async def _error(self, response: aiohttp.ClientResponse, path: str) -> InterlockError:
        try:
            raw = await response.content.read(_MAX_ERROR_BODY)
        except (aiohttp.ClientError, TimeoutError):
            raw = b""
        status = response.status
        message = self._redact(str(_error_dict(raw, status).get("message") or f"HTTP {status}"))
        retry_after = _retry_after(response.headers.get("retry-after"))
        if status == 404 and _NOT_FOUND.match(message):
            model = self.config.model
            return ModelNotPulled(f"the model {model} is not pulled on the Ollama server of backend "
                                  f"{self.name!r} (ollama said: {message}); an operator must run "
                                  f"`ollama pull {model}`", param="model")
        if status == 404:
            return UnsupportedEndpoint(f"this backend's Ollama server does not serve {path} "
                                       f"({message}); it may be too old", param="model")
        if status == 400:
            if "does not support" in message:
                for word, param in _CAPABILITY_PARAMS:
                    if message.endswith(f"does not support {word}"):
                        return InvalidRequest(f"ollama: {message}", param=param)
                return UnsupportedEndpoint(f"ollama: {message}", param="model")
            return InvalidRequest(f"ollama rejected the request: {message}")
        if status in (401, 403):
            return BackendUnavailable("the upstream refused the gateway's credentials", status=502)
        if status in (429, 503):
            return BackendOverloaded(f"ollama is busy: {message}", status=status, retry_after=retry_after)
        if status == 499:
            return BackendUnavailable("ollama cancelled the request")
        return UpstreamHTTPError(status, {"message": f"ollama: {message}"}, retry_after=retry_after)

    # -- health and load ------------------------------------------------------------------------

    async def health(self) -> Health:
        timeout = aiohttp.ClientTimeout(total=_HEALTH_TIMEOUT_S, sock_connect=self.config.timeouts.connect)
        try:
            async with self._http.session.get(self.config.url + "/api/tags", headers=self._extra_headers,
                                              timeout=timeout) as response:
                if response.status != 200:
                    return Health(False, f"ollama at {self._host} answered GET /api/tags with "
                                         f"HTTP {response.status}")
                raw = await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError):
            return Health(False, f"cannot reach ollama at {self._host}")
        try:
            data = orjson.loads(raw)
            names = {normalise_model_name(str(m.get("name") or m.get("model") or ""))
                     for m in data["models"] or ()}
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return Health(False, f"the server at {self._host} did not answer GET /api/tags like Ollama")
        model = self.config.model
        if normalise_model_name(model) not in names:
            return Health(False, f"model {model} is not pulled (ollama pull {model})", misconfigured=True)
        if self._loading():
            return Health(False, f"ollama is loading model {model}")
        return Health(True)

    def load(self) -> Load:
        return Load(in_flight=self._in_flight)

    def _log_timings(self, request_id: str, data: dict[str, Any]) -> None:
        load_ns = _int(data.get("load_duration"))
        if load_ns > 1e9:
            log.info("%s: %s waited %.1fs for ollama to load %s", self.name, request_id, load_ns / 1e9,
                     self.config.model)
        if log.isEnabledFor(logging.DEBUG):
            prompt_n, eval_n = _int(data.get("prompt_eval_count")), _int(data.get("eval_count"))
            eval_ns = _int(data.get("eval_duration"))
            log.debug("%s: %s ollama timings: total %.1f ms, load %.1f ms, prompt %d tokens in %.1f ms, "
                      "reply %d tokens in %.1f ms (%.1f tokens/s)", self.name, request_id,
                      _int(data.get("total_duration")) / 1e6, load_ns / 1e6, prompt_n,
                      _int(data.get("prompt_eval_duration")) / 1e6, eval_n, eval_ns / 1e6,
                      eval_n / eval_ns * 1e9 if eval_ns else 0.0)


class _NdjsonRelay:
    """The stream() iterator: reads NDJSON lines and yields OpenAI SSE bytes.

    A class rather than an async generator so that ``aclose()`` frees the connection even when
    nobody iterated it yet. Ending without ``done: true`` is an error; closing early (client gone)
    closes the connection, which makes Ollama stop generating.
    """

    def __init__(self, backend: OllamaBackend, response: aiohttp.ClientResponse, shape: _Shape,
                 request_id: str) -> None:
        self._backend = backend
        self._response: aiohttp.ClientResponse | None = response
        self._shape = shape
        self._request_id = request_id
        self._buffer = bytearray()
        self._scanned = 0
        self._ready: deque[bytes] = deque()
        self._finished = False

    def __aiter__(self) -> _NdjsonRelay:
        return self

    async def prime(self) -> None:
        """Read until there is something to send (or the reply is complete); errors raise here."""
        while not self._ready and not self._finished:
            await self._read_one()

    async def __anext__(self) -> bytes:
        while not self._ready:
            if self._finished:
                raise StopAsyncIteration
            await self._read_one()
        return self._ready.popleft()

    async def _read_one(self) -> None:
        if self._response is None:
            raise BackendUnavailable("the ollama stream was already closed")
        try:
            line = await self._next_line(self._response)
            if line is None:
                raise BackendUnavailable("ollama ended the stream before it finished (no done line)")
            data = self._backend._parse(line)
            out, done = self._shape.feed(data)
        except TimeoutError:
            self._end(clean=False)
            raise BackendTimeout("the ollama stream went past its total time limit") from None
        except aiohttp.ClientError as exc:
            self._end(clean=False)
            raise self._backend._upstream._unavailable(exc) from None
        except BaseException:
            self._end(clean=False)
            raise
        if out:
            self._ready.append(out)
        if done:
            self._finished = True
            self._backend._log_timings(self._request_id, data)
            self._end(clean=True)

    async def _next_line(self, response: aiohttp.ClientResponse) -> bytes | None:
        buffer = self._buffer
        while True:
            at = buffer.find(b"\n", self._scanned)
            if at >= 0:
                line = bytes(buffer[:at])
                del buffer[:at + 1]
                self._scanned = 0
                if line.strip():
                    return line
                continue
            self._scanned = len(buffer)
            if len(buffer) > _MAX_LINE:
                raise BackendUnavailable("ollama sent a line longer than 16 MiB")
            data = await response.content.readany()
            if not data:  # EOF: a last line without its newline still counts
                line = bytes(buffer)
                buffer.clear()
                self._scanned = 0
                return line if line.strip() else None
            buffer += data

    async def aclose(self) -> None:
        self._end(clean=False)

    def _end(self, *, clean: bool) -> None:
        response, self._response = self._response, None
        if response is None:
            return
        self._backend._in_flight -= 1
        # release() keeps a fully read connection for reuse; close() drops it, which is what tells a
        # still-generating Ollama that nobody is listening any more
        if clean:
            response.release()
        else:
            response.close()

    def __del__(self) -> None:
        if self._response is not None:
            self._response.close()


# --- request translation -----------------------------------------------------------------------


def _client_model(request: BackendRequest) -> str:
    model = request.body.get("model")
    return model if isinstance(model, str) else ""


def _refuse_unsupported(body: dict[str, Any], endpoint: str) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidRequest("n > 1 is not supported by the ollama backend (one choice per request)",
                             param="n")
    if body.get("logprobs") not in (None, False):
        raise InvalidRequest("logprobs are not supported by the ollama backend", param="logprobs")
    if body.get("top_logprobs") not in (None, 0):
        raise InvalidRequest("top_logprobs are not supported by the ollama backend", param="top_logprobs")
    if body.get("logit_bias"):
        raise InvalidRequest("logit_bias is not supported by the ollama backend", param="logit_bias")
    if endpoint == "completions":
        if body.get("echo"):
            raise InvalidRequest("echo is not supported by the ollama backend", param="echo")
        if body.get("best_of") not in (None, 1):
            raise InvalidRequest("best_of > 1 is not supported by the ollama backend", param="best_of")
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise InvalidRequest("tool_choice must be auto or none with the ollama backend "
                             "(Ollama lets the model decide)", param="tool_choice")


#: vLLM-style sampling extras an Ollama option of the same meaning exists for: name -> (option, type)
_EXTRAS: dict[str, tuple[str, type]] = {"top_k": ("top_k", int), "min_p": ("min_p", float),
                                        "repeat_penalty": ("repeat_penalty", float),
                                        "repetition_penalty": ("repeat_penalty", float)}


def _sampling(body: dict[str, Any], endpoint: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
        if body.get(key) is not None:
            options[key] = body[key]
    for key, (option, kind) in _EXTRAS.items():
        value = body.get(key)
        if value is None:
            continue
        ok = type(value) is int if kind is int else type(value) in (int, float)
        if not ok:
            raise InvalidRequest(f"{key} must be {'an integer' if kind is int else 'a number'}", param=key)
        options[option] = value
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    if stops:
        options["stop"] = stops
    limit = body.get("max_completion_tokens") if endpoint == "chat" else None
    if limit is None:
        limit = body.get("max_tokens")
    if limit is not None:
        options["num_predict"] = limit
    return options


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    out: list[dict[str, Any]] = []
    tool_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest("each message must be an object", param=where)
        role = message.get("role")
        text, images = _content(message.get("content"), where)
        entry: dict[str, Any] = {"role": {"developer": "system", "function": "tool"}.get(role, role),
                                 "content": text}
        if images:
            entry["images"] = images
        for call in message.get("tool_calls") or ():
            entry.setdefault("tool_calls", []).append(_tool_call_in(call, f"{where}.tool_calls"))
            call_id, fn = call.get("id"), call.get("function") or {}
            if isinstance(call_id, str) and isinstance(fn.get("name"), str):
                tool_names[call_id] = fn["name"]
        if role == "tool":
            call_id = message.get("tool_call_id")
            if isinstance(call_id, str):
                entry["tool_call_id"] = call_id
                if call_id in tool_names:
                    entry["tool_name"] = tool_names[call_id]
        elif role == "function" and isinstance(message.get("name"), str):
            entry["tool_name"] = message["name"]
        out.append(entry)
    return out


def _content(content: Any, where: str) -> tuple[str, list[str]]:
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise InvalidRequest("content must be a string or a list of parts", param=f"{where}.content")
    texts: list[str] = []
    images: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            images.append(_image(part.get("image_url"), f"{where}.content"))
        else:
            raise InvalidRequest(f"content parts of type {kind!r} are not supported by the ollama backend "
                                 "(text and base64 image_url only)", param=f"{where}.content")
    return "".join(texts), images


def _image(value: Any, where: str) -> str:
    url = value.get("url") if isinstance(value, dict) else value
    if isinstance(url, str) and url.startswith("data:"):
        header, sep, data = url.partition(",")
        if sep and header.endswith(";base64") and data:
            return data
    raise InvalidRequest("the ollama backend takes images as base64 data: URLs "
                         "(data:image/png;base64,...), not links it would have to fetch", param=where)


def _tool_call_in(call: Any, where: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequest("each tool call needs a function with a name", param=where)
    arguments = fn.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = orjson.loads(arguments) if arguments.strip() else {}
        except orjson.JSONDecodeError:
            raise InvalidRequest("tool call arguments must be a JSON object", param=where) from None
    if not isinstance(arguments, dict):
        raise InvalidRequest("tool call arguments must be a JSON object", param=where)
    out: dict[str, Any] = {"function": {"name": fn["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _format(response_format: Any) -> Any:
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest("response_format json_schema needs json_schema.schema (an object)",
                                 param="response_format")
        return schema
    raise InvalidRequest("response_format must be text, json_object or json_schema", param="response_format")


def _think(effort: Any) -> bool | str | None:
    if effort is None:
        return None
    if effort == "none":
        return False
    if effort in ("low", "medium", "high"):
        return str(effort)
    raise InvalidRequest("reasoning_effort must be none, low, medium or high with the ollama backend",
                         param="reasoning_effort")


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise InvalidRequest("several prompts in one request are not supported by the ollama backend "
                             "(send one request per prompt)", param="prompt")
    raise InvalidRequest("the ollama backend takes the prompt as text (a string or a list of one string), "
                         "not token ids", param="prompt")


# --- reply translation -------------------------------------------------------------------------


def _int(value: Any) -> int:
    return value if type(value) is int else 0


def _usage(data: dict[str, Any]) -> Usage:
    return Usage(_int(data.get("prompt_eval_count")), _int(data.get("eval_count")))


def _usage_dict(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def _finish_reason(done_reason: Any, tool_calls: bool) -> str:
    if done_reason == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


def _tool_call_out(call: Any, index: int | None) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    fn = fn if isinstance(fn, dict) else {}
    arguments = fn.get("arguments")
    out: dict[str, Any] = {} if index is None else {"index": index}
    call_id = call.get("id") if isinstance(call, dict) else None
    out["id"] = call_id if isinstance(call_id, str) and call_id else "call_" + uuid.uuid4().hex[:24]
    out["type"] = "function"
    out["function"] = {"name": str(fn.get("name") or ""),
                       "arguments": arguments if isinstance(arguments, str)
                       else orjson.dumps(arguments if arguments is not None else {}).decode()}
    return out


class _Shape:
    """The OpenAI bodies and SSE chunks of one request (built byte-wise, as backends.llamacpp_chat)."""

    def __init__(self, chat: bool, model: str, *, include_usage: bool = False) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self._head = (f'data: {{"id":"{self.id}","object":"{self.object}","created":{self.created},'
                      f'"model":').encode() + orjson.dumps(model) + b',"choices":'
        key = b'"delta":{"content":' if chat else b'"text":'
        self._delta_prefix = self._head + b'[{"index":0,' + key
        self._delta_suffix = (b"}" if chat else b"") + b',"logprobs":null,"finish_reason":null}]}\n\n'
        self._started = False
        self._tool_calls = 0

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        return self._head + orjson.dumps([{"index": 0, **choice, "logprobs": None,
                                           "finish_reason": choice.get("finish_reason")}]) + b"}\n\n"

    def feed(self, data: dict[str, Any]) -> tuple[bytes, bool]:
        """One NDJSON object → the SSE bytes it makes (maybe none), and whether it was the last."""
        out = bytearray()
        if self.chat:
            if not self._started:
                self._started = True
                out += self._chunk({"delta": {"role": "assistant", "content": ""}})
            message = data.get("message")
            message = message if isinstance(message, dict) else {}
            thinking = message.get("thinking")
            if isinstance(thinking, str) and thinking:
                out += self._chunk({"delta": {"reasoning_content": thinking}})
            content = message.get("content")
            if isinstance(content, str) and content:
                out += self._delta_prefix + orjson.dumps(content) + self._delta_suffix
            calls = message.get("tool_calls")
            if isinstance(calls, list) and calls:
                deltas = []
                for call in calls:
                    deltas.append(_tool_call_out(call, self._tool_calls))
                    self._tool_calls += 1
                out += self._chunk({"delta": {"tool_calls": deltas}})
        else:
            text = data.get("response")
            if isinstance(text, str) and text:
                out += self._delta_prefix + orjson.dumps(text) + self._delta_suffix
        done = data.get("done") is True
        if done:
            finish = _finish_reason(data.get("done_reason"), self._tool_calls > 0)
            empty: dict[str, Any] = {"delta": {}} if self.chat else {"text": ""}
            out += self._chunk({**empty, "finish_reason": finish})
            if self.include_usage:
                out += self._head + b'[],"usage":' + orjson.dumps(_usage_dict(_usage(data))) + b"}\n\n"
            out += _DONE
        return bytes(out), done

    def body(self, data: dict[str, Any]) -> bytes:
        """The non-streamed ``chat.completion`` / ``text_completion`` JSON from Ollama's one object."""
        finish: str
        if self.chat:
            message = data.get("message")
            message = message if isinstance(message, dict) else {}
            content = message.get("content") if isinstance(message.get("content"), str) else ""
            calls = message.get("tool_calls") if isinstance(message.get("tool_calls"), list) else []
            reply: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else ""),
                                     "refusal": None}
            thinking = message.get("thinking")
            if isinstance(thinking, str) and thinking:
                reply["reasoning_content"] = thinking
            if calls:
                reply["tool_calls"] = [_tool_call_out(c, None) for c in calls]
            finish = _finish_reason(data.get("done_reason"), bool(calls))
            choice: dict[str, Any] = {"index": 0, "message": reply, "logprobs": None, "finish_reason": finish}
        else:
            text = data.get("response") if isinstance(data.get("response"), str) else ""
            finish = _finish_reason(data.get("done_reason"), False)
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return orjson.dumps({
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": _usage_dict(_usage(data)),
        })


def _embeddings_reply(data: dict[str, Any], model: str, encoding: Any) -> BackendResponse:
    vectors = data.get("embeddings")
    if not isinstance(vectors, list) or not all(isinstance(v, list) for v in vectors):
        raise BackendUnavailable("ollama's /api/embed reply has no embeddings list")
    items = []
    for index, vector in enumerate(vectors):
        value: Any = vector
        if encoding == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        items.append({"object": "embedding", "index": index, "embedding": value})
    prompt_tokens = _int(data.get("prompt_eval_count"))
    body = orjson.dumps({"object": "list", "data": items, "model": model,
                         "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})
    return BackendResponse(body=body, usage=Usage(prompt_tokens, 0))
