"""``kind: vllm``'s settings, and the URL forms they accept (``backends.vllm`` documents the rules)."""

from __future__ import annotations

from typing import Literal, Self
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from backends.base import BackendConfig
from backends.http_timeouts import TimeoutsConfig
from backends.vllm.affinity import Routing


class VllmConfig(BackendConfig):
    kind: Literal["vllm"]
    #: base URLs (``http://10.0.0.5:8000``, with or without ``/v1``); or ``dns``, not both
    endpoints: list[str] | None = None
    #: ``host:port`` resolved to every address it has, re-resolved every ``dns_refresh_s``
    dns: str | None = None
    dns_refresh_s: float = Field(default=30.0, gt=0)
    #: the upstream's model name; unset sends the client's
    model: str | None = None
    api_key: SecretStr | None = None
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    #: seconds between /metrics scrapes of each endpoint
    scrape_interval_s: float = Field(default=2.0, gt=0)
    #: seconds between GET /health checks of each endpoint
    health_interval_s: float = Field(default=5.0, gt=0)
    routing: Routing = "auto"
    #: characters per block of the prefix index (~64 tokens)
    prefix_block_chars: int = Field(default=256, ge=16)
    #: seconds a prompt is assumed to stay in an endpoint's prefix cache
    prefix_ttl_s: float = Field(default=600.0, gt=0)
    #: blocks remembered per endpoint (20,000 x 256 chars is ~1.3M tokens, more than one GPU's KV cache)
    prefix_index_blocks: int = Field(default=20_000, ge=1)
    #: optional hard cap (``auto``): an endpoint more than this many tokens of queued work busier
    #: than the least busy is not chosen, whatever the cost model expects. Unset (the default): the
    #: cost model alone decides, in time, with coefficients fit per endpoint; nothing to tune.
    load_guard: int | None = Field(default=None, ge=0)
    #: consecutive connection errors / 5xx after which an endpoint leaves the rotation
    eject_after_failures: int = Field(default=3, ge=1)

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must list at least one URL")
        roots = [endpoint_root(url) for url in value]
        if len(set(roots)) != len(roots):
            raise ValueError("lists the same endpoint twice")
        return roots

    @field_validator("dns")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            split_host_port(value)
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.endpoints is None) == (self.dns is None):
            raise ValueError("set exactly one of endpoints (a list of URLs) and dns (host:port)")
        return self


def endpoint_root(url: str) -> str:
    """``http://h:8000/v1/`` -> ``http://h:8000``: the server's root, where /health and /metrics live."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: a base URL takes no query or fragment")
    path = parts.path.rstrip("/").removesuffix("/v1").rstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or "/" in value or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be host:port, e.g. vllm.internal:8000")
    return host, int(port)


__all__ = ["VllmConfig", "endpoint_root", "split_host_port"]
