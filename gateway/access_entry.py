"""An inference request's access-log entry, from what its ``Exchange`` saw.

The entry holds figures the request already had (``gateway.access_log`` queues it, its writer
process formats and writes it): who answered, why, the cache result, the status, the times, the
tokens and cost, who hung up (``client``: the client left before the end; ``upstream``: it
failed after its first byte), and the reply's last bytes, read for its finish reason and error
code but never written.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import Scope

from gateway.metrics_edge import Exchange
from gateway.middleware import CLIENT_KEY, REQUEST_ID_KEY
from gateway.tracing import TRACE_ID_KEY

#: kept from a reply for the access log's finish reason, usage and error (they sit near the end)
TAIL_BYTES = 2048


def access_entry(
    ex: Exchange,
    scope: Scope,
    request: Any,
    model: object,
    route: str,
    backend: str,
    reason: str | None,
    cached: str | None,
    status: int,
    stream: bool,
    errored: bool,
    duration: float,
    ttft: float | None,
    overhead: float | None,
    cost: float,
) -> tuple[Any, ...]:
    """The access-log entry of a request that is over, from its Exchange and what
    ``Metrics.finish`` settled of it (the route, the backend, the status, the figures): an
    ``Entry``'s fields as a plain tuple (``AccessLog.write`` takes that, for ``marshal``)."""
    if ex.status is None or (stream and not ex.done):
        disconnect = "client"
    elif ex.broke:
        disconnect = "upstream"
    else:
        disconnect = "none"
    if stream:
        tail = ex.last
        if len(tail) < TAIL_BYTES:
            tail = ex.p2 + ex.prev + tail
        tail = tail[-TAIL_BYTES:]
    elif status >= 400 or (request is not None and request.endpoint != "embeddings"):
        tail = ex.last[-TAIL_BYTES:]
    else:
        tail = b""
    key, usage = scope.get(CLIENT_KEY), ex.usage
    return (  # an Entry's fields
        time.time() - duration,
        scope.get(REQUEST_ID_KEY),
        scope.get(TRACE_ID_KEY),
        request.endpoint if request is not None else None,
        route,
        model[:128] if isinstance(model, str) else None,
        backend,
        ex.attempts,
        reason if reason is not None else ("; ".join(ex.failures) or None),
        cached,
        status,
        stream,
        errored,
        ttft,
        duration,
        ex.upstream_s if ex.attempts else None,
        overhead,
        usage.prompt_tokens if usage is not None else None,
        usage.completion_tokens if usage is not None else None,
        cost,
        disconnect,
        key.name if key is not None else None,
        tail,
    )
