"""What Ollama's error replies mean, as the gateway's errors (``backends.errors``).

Ollama answers ``{"error": "<msg>"}`` (API reference §6): 404 ``model ... not found`` (both
wordings) → ``ModelNotPulled``; 400 → ``InvalidRequest`` (``does not support chat|generate|embed``
→ ``UnsupportedEndpoint``; ``does not support tools|insert|thinking`` names the request field
that asked for it); 503 (queue full) and 429 → ``BackendOverloaded``, with ``Retry-After`` only
when one was sent (Ollama sends none; a proxy might: none is invented, since the gateway's
breaker opens at once on a Retry-After); a 500 ``invalid JSON schema in format`` / ``invalid
format`` (a ``response_format`` schema Ollama cannot turn into a grammar) → ``InvalidRequest``
on ``response_format``, never counted; other 5xx → ``UpstreamHTTPError`` (retryable, the client
sees 502).

Why ``ModelNotPulled`` is a 404 and not retryable: the model exists in the gateway's config but
not on the Ollama server, which is an operator's configuration problem, not an outage, so the
breaker must not count it (``retryable = False``; note the router then does not try another
backend either). 404 ``not_found`` matches what Ollama and OpenAI answer for a missing model and
what the openai SDK raises as ``NotFoundError``, which clients already treat as "do not retry";
its ``code`` (``model_not_pulled``) and message tell it apart from the gateway's own unknown-model
404 (``model_not_found``).
"""

from __future__ import annotations

import re

from backends.errors import (
    BackendOverloaded,
    BackendUnavailable,
    InterlockError,
    InvalidRequest,
    UnsupportedEndpoint,
    UpstreamHTTPError,
)

_NOT_FOUND = re.compile(r"^model .* not found")
#: what Ollama's routes say of a ``format`` they cannot use (with status 500)
_FORMAT_REJECTED = re.compile(r"^(invalid JSON schema in format|invalid format: )")
#: a 400 ``... does not support <word>`` names the request field that asked for it
_CAPABILITY_PARAMS = (("tools", "tools"), ("insert", "suffix"), ("thinking", "reasoning_effort"))


class ModelNotPulled(InvalidRequest):
    """The configured model is not on the Ollama server: a configuration problem, never retried."""

    status = 404
    code = "model_not_pulled"


def ollama_error(
    status: int, message: str, retry_after: float | None, *, backend: str, model: str, path: str
) -> InterlockError:
    """The error for Ollama's answer ``status`` with its (redacted) ``message`` to a POST of
    ``path`` by ``backend``, which serves ``model``."""
    if status == 404 and _NOT_FOUND.match(message):
        return ModelNotPulled(
            f"the model {model} is not pulled on the Ollama server of backend "
            f"{backend!r} (ollama said: {message}); an operator must run "
            f"`ollama pull {model}`",
            param="model",
        )
    if status == 404:
        return UnsupportedEndpoint(
            f"this backend's Ollama server does not serve {path} ({message}); it may be too old",
            param="model",
        )
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
    if status == 500 and _FORMAT_REJECTED.match(message):
        # Ollama reports a schema it cannot turn into a grammar on its generic 500 path: the
        # request is at fault, not the server, so it must not count against the breaker.
        return InvalidRequest(f"ollama cannot use this response_format: {message}", param="response_format")
    return UpstreamHTTPError(status, {"message": f"ollama: {message}"}, retry_after=retry_after)
