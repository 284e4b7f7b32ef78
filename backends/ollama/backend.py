"""``kind: ollama``: an Ollama server through its native API (/api/chat, /api/generate, /api/embed).

Written from Ollama's API reference (https://github.com/ollama/ollama/blob/main/docs/api.md, checked
against Ollama's source); the section numbers (§) count that document's endpoint sections.

How an OpenAI request becomes an Ollama one (chat → ``/api/chat``, completions →
``/api/generate``, embeddings → ``/api/embed``, options) and which parameters are refused is
``backends.ollama.request``; how Ollama's replies become OpenAI's is ``backends.ollama.reply``
(both pure translation); what its error replies mean is ``backends.ollama.errors``; the settings
are ``backends.ollama.config``. This module is the backend around them.

What follows the reference
    * streams (§1, §6): NDJSON relayed as SSE line by line as it arrives
      (``backends.ollama.stream``); closing the iterator closes the connection, which is how
      Ollama learns the client left (it then stops generating).
    * errors (§6): mapped by ``backends.ollama.errors``; connect failures and timeouts →
      ``BackendUnavailable`` / ``BackendTimeout`` (the shared ``backends.http`` plumbing,
      including its one retry on a stale keep-alive connection).
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

Not supported: see ``backends.ollama.request`` (each refusal is a 400 naming the parameter).
Not used: Ollama's ``/v1`` OpenAI layer (for that, use ``kind: openai``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from backends.base import BackendRequest, BackendResponse, Health, Load, Resources
from backends.errors import (
    BackendError,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    InterlockError,
    UnsupportedEndpoint,
)
from backends.http import OpenAICompatibleUpstream, error_dict, retry_after_s
from backends.http_limits import read_capped
from backends.http_timeouts import Timeouts
from backends.ollama.config import OllamaConfig
from backends.ollama.errors import ollama_error
from backends.ollama.reply import Shape, client_model, embeddings_reply, int_or_zero, reply_usage
from backends.ollama.request import load_fields, request_payload
from backends.ollama.stream import NdjsonRelay

log = logging.getLogger("interlock.backends.ollama")

_MAX_ERROR_BODY = 64 * 1024
_MAX_MESSAGE = 1000
#: Retry-After while the model is being preloaded
_LOADING_RETRY_AFTER_S = 2.0
#: GET /api/tags must answer within this (the health monitor bounds it too)
_HEALTH_TIMEOUT_S = 3.0


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
        self._secrets = tuple(
            s
            for s in (config.url, parts.netloc, *(v for v in self._extra_headers.values() if len(v) >= 8))
            if s
        )
        t = config.timeouts
        self._upstream = self._make_upstream(t.build())
        self._in_flight = 0
        self._preload: asyncio.Task[None] | None = None

    def _make_upstream(self, timeouts: Timeouts) -> OpenAICompatibleUpstream:
        # Only its POST (timeouts, one retry on a stale pooled connection, failure mapping) and its
        # redaction are used: Ollama speaks NDJSON, not SSE, so replies are read here.
        return OpenAICompatibleUpstream(
            http=self._http,
            base_url=self.config.url,
            headers=self._headers,
            timeouts=timeouts,
            secrets=self._secrets,
        )

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
        log.info(
            "%s: ollama loaded model %s in %.1fs", self.name, self.config.model, time.monotonic() - started
        )

    # -- requests -------------------------------------------------------------------------------

    def _refuse_while_loading(self) -> None:
        if self._loading():
            raise BackendOverloaded(
                f"the model {self.config.model} is still loading into Ollama; retry shortly",
                retry_after=_LOADING_RETRY_AFTER_S,
            )

    async def complete(self, request: BackendRequest) -> BackendResponse:
        path, payload = self._payload(request, stream=False)  # a bad request is a 400 even while loading
        self._refuse_while_loading()
        self._in_flight += 1
        try:
            data = await self._call(self._upstream, path, payload, request.request_id)
        finally:
            self._in_flight -= 1
        model = client_model(request)
        if request.endpoint == "embeddings":
            return embeddings_reply(data, model, request.body.get("encoding_format"))
        shape = Shape(request.endpoint == "chat", model)
        body = shape.body(data)
        self._log_timings(request.request_id, data)
        return BackendResponse(body=body, usage=reply_usage(data))

    async def stream(self, request: BackendRequest) -> NdjsonRelay:
        path, payload = self._payload(request, stream=True)
        self._refuse_while_loading()
        options = request.body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        shape = Shape(request.endpoint == "chat", client_model(request), include_usage=include_usage)
        self._in_flight += 1
        try:
            response = await self._post(self._upstream, path, payload, request.request_id, stream=True)
        except BaseException:
            self._in_flight -= 1
            raise
        relay = NdjsonRelay(
            response,
            shape,
            idle=self.config.timeouts.idle,
            parse=self._parse,
            unavailable=self._upstream.unavailable,
            on_done=lambda data: self._log_timings(request.request_id, data),
            on_end=self._stream_ended,
        )
        try:
            async with asyncio.timeout(self.config.timeouts.first_token):
                await relay.prime()
        except TimeoutError:
            await relay.aclose()
            raise BackendTimeout(
                f"no first token from ollama within {self.config.timeouts.first_token:g}s"
            ) from None
        except BaseException:
            await relay.aclose()
            raise
        return relay

    def _payload(self, request: BackendRequest, *, stream: bool) -> tuple[str, dict[str, Any]]:
        return request_payload(
            request.body,
            request.endpoint,
            model=self.config.model,
            stream=stream,
            num_ctx=self.config.num_ctx,
            keep_alive=self.config.keep_alive,
        )

    def _common(self) -> dict[str, Any]:
        """What every request carries so that Ollama keeps (not reloads) the same model instance."""
        return load_fields(self.config.num_ctx, self.config.keep_alive)

    # -- HTTP -----------------------------------------------------------------------------------

    async def _post(
        self,
        upstream: OpenAICompatibleUpstream,
        path: str,
        payload: dict[str, Any],
        request_id: str,
        *,
        stream: bool,
    ) -> aiohttp.ClientResponse:
        """POST and return the response once its status is known good; every failure is mapped."""
        response = await upstream.send(path, orjson.dumps(payload), request_id)
        if response.status >= 400:
            try:
                raise await self._error(response, path)
            finally:
                response.release()
        ctype = response.content_type
        if ctype not in ("application/json", "application/x-ndjson"):
            response.close()
            raise BackendUnavailable(
                f"ollama answered {path} with {ctype or 'no content type'}, "
                f"not {'NDJSON' if stream else 'JSON'}"
            )
        return response

    async def _call(
        self, upstream: OpenAICompatibleUpstream, path: str, payload: dict[str, Any], request_id: str
    ) -> dict[str, Any]:
        """A non-streamed call: the reply's JSON object."""
        response = await self._post(upstream, path, payload, request_id, stream=False)
        try:
            raw = await read_capped(response, self._http.max_reply_bytes)
        except TimeoutError:
            raise BackendTimeout(f"ollama did not finish within {upstream.timeouts.total:g}s") from None
        except aiohttp.ClientError as exc:
            raise upstream.unavailable(exc) from None
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
        return self._upstream.redact(text)[:_MAX_MESSAGE]

    async def _error(self, response: aiohttp.ClientResponse, path: str) -> InterlockError:
        try:
            raw = await response.content.read(_MAX_ERROR_BODY)
        except (aiohttp.ClientError, TimeoutError):
            raw = b""
        status = response.status
        message = self._redact(str(error_dict(raw, status).get("message") or f"HTTP {status}"))
        retry_after = retry_after_s(response.headers.get("retry-after"))
        return ollama_error(
            status, message, retry_after, backend=self.name, model=self.config.model, path=path
        )

    # -- health and load ------------------------------------------------------------------------

    async def health(self) -> Health:
        timeout = aiohttp.ClientTimeout(total=_HEALTH_TIMEOUT_S, sock_connect=self.config.timeouts.connect)
        try:
            async with self._http.session.get(
                self.config.url + "/api/tags", headers=self._extra_headers, timeout=timeout
            ) as response:
                if response.status != 200:
                    return Health(
                        False, f"ollama at {self._host} answered GET /api/tags with HTTP {response.status}"
                    )
                raw = await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError):
            return Health(False, f"cannot reach ollama at {self._host}")
        try:
            data = orjson.loads(raw)
            names = {
                normalise_model_name(str(m.get("name") or m.get("model") or "")) for m in data["models"] or ()
            }
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

    def fatal(self) -> str | None:
        return None  # a remote server's faults are its own: health() reports them

    def describe(self) -> dict[str, object]:
        return {"model": self.config.model}

    def _stream_ended(self) -> None:
        self._in_flight -= 1

    def _log_timings(self, request_id: str, data: dict[str, Any]) -> None:
        load_ns = int_or_zero(data.get("load_duration"))
        if load_ns > 1e9:
            log.info(
                "%s: %s waited %.1fs for ollama to load %s",
                self.name,
                request_id,
                load_ns / 1e9,
                self.config.model,
            )
        if log.isEnabledFor(logging.DEBUG):
            prompt_n, eval_n = int_or_zero(data.get("prompt_eval_count")), int_or_zero(data.get("eval_count"))
            eval_ns = int_or_zero(data.get("eval_duration"))
            log.debug(
                "%s: %s ollama timings: total %.1f ms, load %.1f ms, prompt %d tokens in %.1f ms, "
                "reply %d tokens in %.1f ms (%.1f tokens/s)",
                self.name,
                request_id,
                int_or_zero(data.get("total_duration")) / 1e6,
                load_ns / 1e6,
                prompt_n,
                int_or_zero(data.get("prompt_eval_duration")) / 1e6,
                eval_n,
                eval_ns / 1e6,
                eval_n / eval_ns * 1e9 if eval_ns else 0.0,
            )
