"""The error tree shared by every layer of Interlock.

It lives at the bottom of the import graph (backends never import the gateway),
and the gateway adds its client-side errors under the same root. Every class
carries what the HTTP edge needs to render the OpenAI error JSON; the single
place that turns one into a response is ``gateway.errors.error_response``.

    InterlockError
    ├── BackendError                 an upstream could not serve the request
    │   ├── BackendUnavailable       connect failed, reset, dead endpoint      502
    │   ├── BackendOverloaded        busy, not failing: queue full, upstream    429/503 + Retry-After
    │   │                            429/503; the next candidate is tried, no breaker counts it
    │   ├── BackendTimeout           connect / first token / total deadline    504
    │   └── UpstreamHTTPError        upstream answered with an error status     its status (sanitised)
    └── InvalidRequest               the client's request cannot be served      400
        ├── ContextLengthExceeded    prompt (+ max_tokens) over the context
        └── UnsupportedEndpoint      e.g. embeddings on a generative model
    InternalError                    the gateway's own fault (a bug): 500 with the request id;
                                     never retried, never charged to a backend
    (gateway.errors adds Authentication, PermissionDenied, ModelNotFound, RequestTooLarge, ...)
"""

from __future__ import annotations


class InterlockError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    #: a failure of the upstream, not of the client: the router may try another backend
    retryable: bool = False
    #: the upstream is full rather than failing: another backend may serve it, no breaker counts it
    busy: bool = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.param = param
        self.retry_after = retry_after

    def to_dict(self) -> dict[str, object]:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


class InvalidRequest(InterlockError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class UnsupportedEndpoint(InvalidRequest):
    code = "unsupported_endpoint"


class InternalError(InterlockError):
    status = 500
    type = "server_error"
    code = "internal_error"


class BackendError(InterlockError):
    status = 502
    type = "upstream_error"
    retryable = True


class BackendUnavailable(BackendError):
    code = "backend_unavailable"


class BackendOverloaded(BackendError):
    """The backend refused because it is full. Busy is not broken: the router moves on to the
    next candidate, and neither the breaker nor the error rate hears of it."""

    status = 503
    type = "overloaded_error"
    code = "backend_overloaded"
    busy = True


class BackendTimeout(BackendError):
    status = 504
    type = "timeout_error"
    code = "backend_timeout"


class UpstreamHTTPError(BackendError):
    """The upstream answered with an error status; ``error`` is its body, already sanitised."""

    def __init__(self, status: int, error: dict[str, object], *, retry_after: float | None = None) -> None:
        message = str(error.get("message") or f"upstream returned HTTP {status}")
        super().__init__(message, status=status, retry_after=retry_after)
        self.error = error
        # A client mistake that the upstream caught (400, 404, 422...) is not an outage.
        self.retryable = status >= 500 or status in (408, 429)
        # a rate limit or "unavailable, try later" is an upstream at capacity, not a broken one
        self.busy = status in (429, 503)
        raw_type = error.get("type")
        default_type = "invalid_request_error" if status < 500 else self.type
        self.type = raw_type if isinstance(raw_type, str) and raw_type else default_type
        raw_code = error.get("code")
        self.code = raw_code if isinstance(raw_code, str) else None
        raw_param = error.get("param")
        self.param = raw_param if isinstance(raw_param, str) else None
