"""Client-side errors and the one place any error becomes an HTTP reply.

The tree's root and the backend failures live in ``backends.errors`` (the bottom
of the import graph); this module adds what only the HTTP edge can detect and
renders everything as the OpenAI error JSON with the status the official SDK
maps to its exception classes.
"""

from __future__ import annotations

import math

import orjson

from backends.errors import (
    BackendError,
    InterlockError,
    InvalidRequest,
)

__all__ = [
    "AuthenticationFailed",
    "BackendError",
    "HeadersTooLarge",
    "InterlockError",
    "InvalidRequest",
    "ModelNotFound",
    "NotFound",
    "PermissionDenied",
    "QuotaExceeded",
    "RateLimited",
    "RequestTooLarge",
    "ShuttingDown",
    "error_body",
    "error_headers",
    "sse_error_event",
]


class AuthenticationFailed(InterlockError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(InterlockError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFound(InterlockError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it. "
            "GET /v1/models lists the models this key can use.",
            param="model",
        )


class MethodNotAllowed(InterlockError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTooLarge(InterlockError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLarge(InterlockError):
    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class RateLimited(InterlockError):
    """A client key's own limit (``gateway.limits``), not an upstream's: 429 with the exact wait."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit_type: str = "rpm", retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        # OpenAI's error type says which limit: "requests" or "tokens"
        self.type = "tokens" if limit_type == "tpm" else "requests"


class QuotaExceeded(RateLimited):
    """A client key's spending budget is used up."""

    code = "insufficient_quota"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.type = "insufficient_quota"


class ShuttingDown(InterlockError):
    """A stream still open when the grace period of a shutdown ran out."""

    status = 503
    type = "server_error"
    code = "shutting_down"

    def __init__(self, message: str = "the gateway is shutting down") -> None:
        super().__init__(message)


class NotCached(InterlockError):
    """``Cache-Control: only-if-cached`` and no entry (RFC 9111 §5.2.1.7 answers 504)."""

    status = 504
    type = "invalid_request_error"
    code = "not_cached"


def error_body(exc: InterlockError) -> bytes:
    return orjson.dumps({"error": exc.to_dict()})


def error_headers(exc: InterlockError) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    if exc.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(exc.retry_after)))
        if isinstance(exc, RateLimited):  # the exact wait, as OpenAI sends it
            headers["retry-after-ms"] = str(max(1, math.ceil(exc.retry_after * 1000)))
    return headers


def client_status(exc: InterlockError) -> int:
    """The status a client sees: upstream server trouble is the gateway's 502, not a 500."""
    status = exc.status
    if isinstance(exc, BackendError) and status >= 500 and status not in (502, 503, 504):
        return 502
    if status == 500:
        return 502 if isinstance(exc, BackendError) else 500
    return status


def sse_error_event(exc: InterlockError) -> bytes:
    """vLLM's in-stream convention, which the openai SDK raises as ``APIError``."""
    return b"data: " + error_body(exc) + b"\n\ndata: [DONE]\n\n"
