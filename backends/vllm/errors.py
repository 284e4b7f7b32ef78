"""What a vLLM endpoint's failure means: for the endpoint, for a retry elsewhere, for the client.

vLLM's errors come back in OpenAI's shapes: an over-long prompt or ``max_tokens`` is a 400
``context_length_exceeded`` with vLLM's numbers; its other 400s keep their message; a model
the pool does not serve is a retryable 502 ``upstream_model_not_found`` (the gateway's
configuration is wrong, not the client's request).
"""

from __future__ import annotations

from backends.errors import (
    BackendOverloaded,
    BackendUnavailable,
    ContextLengthExceeded,
    InterlockError,
    InvalidRequest,
    UpstreamHTTPError,
)


def endpoint_fault(exc: InterlockError) -> bool:
    """A failure that says the endpoint is in trouble: it could not be reached, or answered 5xx."""
    if isinstance(exc, UpstreamHTTPError):
        return exc.status >= 500
    return isinstance(exc, BackendUnavailable)


def retry_elsewhere(exc: InterlockError) -> bool:
    """Another endpoint of the pool may well answer: this one failed, not the request."""
    if isinstance(exc, UpstreamHTTPError):
        return exc.status >= 500
    return isinstance(exc, BackendUnavailable | BackendOverloaded)


def client_error(exc: InterlockError, prompt_field: str | None = None) -> InterlockError:
    """What vLLM said, as a client should see it; ``prompt_field``: the body field holding the prompt."""
    if not isinstance(exc, UpstreamHTTPError):
        return exc
    message = exc.message
    if exc.status == 400 and ("maximum context length" in message or "max_model_len" in message):
        # vLLM names the prompt's length input_tokens; clients know the prompt's own field
        return ContextLengthExceeded(
            message, param="max_tokens" if exc.param == "max_tokens" else prompt_field
        )
    if exc.status in (400, 422):
        return InvalidRequest(message, param=exc.param)
    if exc.status == 404 and exc.param == "model":
        return BackendUnavailable(
            f"the vLLM pool does not serve its model: {message}", code="upstream_model_not_found"
        )
    if exc.status == 404:
        return BackendUnavailable("the upstream has no such route (is it a vLLM server?)")
    return exc
