"""What the spans say: OpenTelemetry's GenAI and HTTP attributes of a request, its reply and its
upstream attempts (https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/).

Pure: no OpenTelemetry import, no span. ``gateway.tracing`` decides when spans open and close and
sets what these functions return. Only numbers and names leave: no prompt or reply text.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from backends.errors import BackendOverloaded, BackendTimeout, BackendUnavailable, UpstreamHTTPError
from gateway.attempts import Attempt

#: OpenAI endpoint → ``gen_ai.operation.name``
OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}
#: request fields → their ``gen_ai.request.*`` attribute (numbers only: no text leaves)
_PARAMETERS = {
    "max_tokens": "gen_ai.request.max_tokens",
    "max_completion_tokens": "gen_ai.request.max_tokens",
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "seed": "gen_ai.request.seed",
}
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,128})"')
_FINISH = re.compile(rb'"finish_reason"\s*:\s*"([a-z_]{1,32})"')


def server_attributes(request: Any, seen: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The server span's attributes from the parsed client request (None: it never parsed) and
    what the reply showed (``status``, ``headers``, its ``first`` and ``last`` bytes); and
    whether the request failed (a 5xx, or a stream that ended with an error event)."""
    attrs: dict[str, Any] = {}
    failed = False
    if request is not None:
        attrs["gen_ai.operation.name"] = OPERATIONS.get(request.endpoint, request.endpoint)
        model = request.body.get("model")
        if isinstance(model, str):
            attrs["gen_ai.request.model"] = model[:128]
        attrs["interlock.stream"] = bool(request.body.get("stream"))
    status = seen.get("status")
    if status is not None:
        attrs["http.response.status_code"] = status
        if status >= 500:
            failed = True
            attrs["error.type"] = str(status)
    for name, value in seen.get("headers", ()):
        if name == b"x-interlock-backend":
            attrs["interlock.backend"] = value.decode()
        elif name == b"x-interlock-route-reason":
            attrs["interlock.route_reason"] = value.decode()[:256]
        elif name == b"x-interlock-cache":
            attrs["interlock.cache"] = value.decode()
        elif name == b"x-interlock-request-id":
            attrs["interlock.request_id"] = value.decode()
    found = _MODEL.search(seen.get("first", b""))
    if found:
        attrs["gen_ai.response.model"] = found.group(1).decode()
    last = seen.get("last", b"")
    finish = _FINISH.findall(last)
    if finish:
        attrs["gen_ai.response.finish_reasons"] = [finish[-1].decode()]
    if b'data: {"error"' in last:  # a stream that ended with an error event
        failed = True
        attrs["error.type"] = "stream_error"
    return attrs, failed


def request_attributes(request: Any) -> tuple[str, str | None, dict[str, Any]]:
    """The operation, the model asked for and the numeric ``gen_ai.request.*`` parameters of the
    parsed client request (None: not parsed, taken for a chat)."""
    if request is None:
        return "chat", None, {}
    body = request.body
    model = body.get("model")
    parameters: dict[str, Any] = {}
    for field, attribute in _PARAMETERS.items():
        value = body.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool):
            parameters[attribute] = value
    return (
        OPERATIONS.get(request.endpoint, request.endpoint),
        model[:128] if isinstance(model, str) else None,
        parameters,
    )


def attempt_end_attributes(attempt: Attempt) -> tuple[dict[str, Any], bool]:
    """An attempt span's closing attributes (outcome, token usage, ``error.type``), and whether
    it failed (counted by its breaker: a busy refusal or an abandoned call did not)."""
    attrs: dict[str, Any] = {"interlock.attempt.outcome": attempt.outcome or "ok"}
    usage = attempt.usage
    if usage is not None:
        attrs["gen_ai.usage.input_tokens"] = usage.prompt_tokens
        attrs["gen_ai.usage.output_tokens"] = usage.completion_tokens
    failed = False
    if attempt.error is not None:
        attrs["error.type"] = _error_type(attempt.error)
        failed = attempt.outcome == "failed"
    return attrs, failed


class ServerAddresses:
    """``server.address`` and ``server.port`` of a backend's URL, parsed once a URL."""

    def __init__(self) -> None:
        self._known: dict[str, dict[str, Any]] = {}

    def of(self, backend: Any) -> dict[str, Any]:
        url = _url_of(backend)
        if url is None:
            return {}
        found = self._known.get(url)
        if found is None:
            parts = urlsplit(url)
            found = {"server.address": parts.hostname} if parts.hostname else {}
            if parts.port:
                found["server.port"] = parts.port
            if len(self._known) < 1024:  # backends come from the config: a handful
                self._known[url] = found
        return found


def _url_of(backend: Any) -> str | None:
    config = getattr(backend, "config", None)
    for field in ("base_url", "url"):
        value = getattr(config, field, None)
        if isinstance(value, str):
            return value
    return None


def _error_type(exc: BaseException) -> str:
    if isinstance(exc, BackendTimeout):
        return "timeout"
    if isinstance(exc, BackendOverloaded):
        return "busy"
    if isinstance(exc, UpstreamHTTPError):
        return str(exc.status)
    if isinstance(exc, BackendUnavailable):
        return "unavailable"
    return type(exc).__name__
