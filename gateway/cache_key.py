"""Response-cache keys, the determinism rule and the request's ``Cache-Control`` (pure: no I/O).

A key is a SHA-256 over a format version, the endpoint, the tenant (the client key's name), the
route (the model name the client sent) and a canonical form of the body: keys sorted, no
whitespace, numbers normalised (``1``, ``1.0`` and ``1e0`` are one number), and the fields that do
not change the answer left out (``stream``, ``stream_options``, ``user``, request ids, cache
controls). So a streamed and a non-streamed request share one entry, and two tenants never do.

The Redis key carries the tenant as a hash tag, ``interlock:v1:{<tenant sha>}:<hash>``: every key
of one tenant, its single-flight lock included, hashes to one Redis Cluster slot, so no command
ever crosses slots (https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/#hash-tags).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

#: bump when the canonical form or the entry format changes: old entries then simply miss
KEY_VERSION = "v1"
PREFIX = f"interlock:{KEY_VERSION}:"

#: fields that shape the transport, the accounting or the cache itself, never the answer
IGNORED_FIELDS = frozenset(
    {
        "stream",
        "stream_options",
        "user",
        "request_id",
        "x-request-id",
        "x_request_id",
        "cache",
        "cache_control",
        "cache-control",
    }
)


def _canonical(value: Any) -> Any:
    """JSON values with every number in one spelling; dict keys are sorted by orjson later."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return repr(value)  # NaN/Infinity are not JSON; a stable spelling is all a key needs
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return str(value)


def canonical_body(body: dict[str, Any]) -> bytes:
    """The semantic body as canonical JSON bytes (sorted keys, no whitespace, normalised numbers)."""
    semantic = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    return orjson.dumps(_canonical(semantic), option=orjson.OPT_SORT_KEYS)


def tenant_tag(tenant: str) -> str:
    """The hash tag of one tenant: short, since it only picks a slot (the key's hash has the tenant)."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:16]


def cache_key(endpoint: str, tenant: str, route: str, body: dict[str, Any]) -> str:
    """The Redis key of this request's entry: ``interlock:v1:{<tenant sha>}:<sha256>``."""
    h = hashlib.sha256()
    # length-prefixed parts: ("ab", "c") and ("a", "bc") must not collide
    for part in (KEY_VERSION, endpoint, tenant, route):
        raw = part.encode()
        h.update(b"%d:" % len(raw))
        h.update(raw)
    h.update(canonical_body(body))
    return f"{PREFIX}{{{tenant_tag(tenant)}}}:{h.hexdigest()}"


def lock_key(key: str) -> str:
    """The single-flight lock of ``key``: the same hash tag, so the same Cluster slot."""
    head, _, digest = key.rpartition(":")
    return f"{head}:lock:{digest}"


def is_deterministic(body: dict[str, Any]) -> bool:
    """Temperature 0, or a ``seed``: the requests whose answer is worth repeating by default.

    OpenAI's default temperature is 1, so a body without one samples
    (https://platform.openai.com/docs/api-reference/chat/create#chat-create-temperature).
    """
    if body.get("seed") is not None:
        return True
    temperature = body.get("temperature")
    return isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 0


# --- Cache-Control request directives --------------------------------------------------------

#: RFC 9111 §1.2.2: a delta-seconds past what one can represent counts as 2^31
MAX_DELTA_SECONDS = 2147483648

_DIRECTIVE = re.compile(r'^\s*([A-Za-z0-9!#$%&\'*+.^_`|~-]+)\s*(?:=\s*(?:"([^"]*)"|([^\s";]*)))?\s*$')


@dataclass(frozen=True, slots=True)
class CacheControl:
    """A request's cache directives (https://www.rfc-editor.org/rfc/rfc9111#section-5.2.1)."""

    #: do not answer from the cache (the answer is still stored)
    no_cache: bool = False
    #: neither read nor store
    no_store: bool = False
    #: accept no entry older than this many seconds
    max_age: float | None = None
    #: answer from the cache or not at all (504 on a miss)
    only_if_cached: bool = False


def parse_cache_control(header_value: str | None) -> CacheControl:
    """Parse a request's ``Cache-Control``; anything not understood is ignored, never an error.

    Names are case-insensitive and arguments may be quoted (RFC 9111 §5.2). Of several
    ``max-age``, the smallest wins: the client will take nothing older than any of them.
    """
    if not header_value:
        return CacheControl()
    no_cache = no_store = only_if_cached = False
    max_age: float | None = None
    for part in header_value.split(","):
        match = _DIRECTIVE.match(part)
        if match is None:
            continue
        name = match.group(1).lower()
        arg = match.group(2) if match.group(2) is not None else match.group(3)
        if name == "no-cache":
            no_cache = True
        elif name == "no-store":
            no_store = True
        elif name == "only-if-cached":
            only_if_cached = True
        elif name == "max-age" and arg is not None and arg.isdigit() and arg.isascii():
            # the length check first: int() refuses strings of over 4300 digits
            seconds = float(MAX_DELTA_SECONDS if len(arg) > 10 else min(int(arg), MAX_DELTA_SECONDS))
            max_age = seconds if max_age is None else min(max_age, seconds)
    return CacheControl(no_cache=no_cache, no_store=no_store, max_age=max_age, only_if_cached=only_if_cached)
