"""Process settings: where to listen, which routing file, limits. Read once at start-up.

Everything that shapes routing lives in the routing YAML (``gateway.config``); these
are the knobs a process manager or container sets through ``INTERLOCK_*`` variables.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INTERLOCK_", extra="ignore")

    #: the routing YAML; unset means the embedded default (in-process SmolLM2)
    config: str | None = None
    #: reload the routing file when its content changes (polled each second); unset: on with a file
    reload_watch: bool | None = None
    #: after a reload, a removed or replaced backend is closed once idle, or after this long
    reload_drain_s: float = Field(default=30.0, ge=0)
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    #: gateway processes on the one port (``gateway.workers``); an in-process model needs 1
    workers: int = Field(default=1, ge=1, le=256)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Redis for shared cache/limits/breaker state; unset means per-process memory
    redis_url: str | None = None
    #: the start of every Redis key of the per-key limits (gateways that share limits share it)
    limits_prefix: str = Field(default="interlock:limits:", min_length=1, max_length=100)
    #: this replica's id among those sharing Redis (a pod name); unset: hostname-pid
    replica: str | None = Field(default=None, min_length=1, max_length=200)
    #: binding to a non-loopback address with no client keys configured needs this
    allow_unauthenticated: bool = False
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    #: how long a shutdown waits for in-flight streams to finish; streams still open then end
    #: with an error event shortly before it runs out
    graceful_shutdown_s: float = Field(default=30.0, ge=0)
    #: after SIGTERM, readiness answers 503 this long while the port still takes connections,
    #: so a load balancer sees the replica drain before it stops listening (a second signal skips it)
    shutdown_delay_s: float = Field(default=5.0, ge=0)
    #: the request line and headers together; larger heads get 431 and the connection is closed
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    #: slow clients: the request head must be in this long after the connection opened or the
    #: previous response ended (else 408 and close)
    header_timeout_s: float = Field(default=10.0, gt=0)
    #: a request body may pause this long, and must average ``body_min_bytes_per_s`` after it
    body_timeout_s: float = Field(default=10.0, gt=0)
    body_min_bytes_per_s: float = Field(default=500.0, ge=0)
    #: an idle keep-alive connection is closed after this (uvicorn's timeout_keep_alive)
    keepalive_timeout_s: float = Field(default=5.0, gt=0)
    #: open connections at most; beyond, a new one gets 503 and is closed
    max_connections: int = Field(default=10_000, ge=1)
    #: a non-streamed upstream reply, counted after decompression; larger ones fail as 502
    max_reply_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    #: ``GET /metrics`` and the per-request observation behind it
    metrics: bool = True
    #: one JSON line per inference request: ``off``, ``stderr`` or a file path
    access_log: str = Field(default="off", min_length=1)
    #: OpenTelemetry traces (the ``otel`` extra): ``off``, ``otlp`` (OTLP over HTTP to
    #: ``OTEL_EXPORTER_OTLP_ENDPOINT``) or ``console``
    traces: Literal["off", "otlp", "console"] = "off"
    #: the share of requests traced (parent-based: a client's sampled flag decides for its own)
    trace_sample_ratio: float = Field(default=1.0, ge=0, le=1)
