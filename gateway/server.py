"""Assembly and serving: config → backends → router → app → uvicorn.

Like uvicorn's own ``Config``/``Server`` split, loading and checking happen
before anything listens; a config that fails never opens the port.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import ipaddress
import logging
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from backends.base import Backend, Resources
from backends.http import HttpClient
from gateway.access_log import access_log_from
from gateway.app import GatewayApp, build_app
from gateway.cache import ResponseCache
from gateway.config import BACKEND_KINDS, ConfigError, LoadedConfig
from gateway.config_peers import ConfigPeers
from gateway.fleet import Fleet
from gateway.health import HealthMonitor
from gateway.http_server import EdgeLimits, edge_protocol
from gateway.limits import Limits
from gateway.metrics_workers import WorkerMetrics
from gateway.reload import Reloader
from gateway.retry_budget import RetryBudget
from gateway.router import Router
from gateway.settings import Settings
from gateway.shutdown import stream_cutoff
from gateway.snapshot import Target, build_snapshot
from gateway.state import Gateway
from gateway.tracing import tracing_from
from gateway.workers import Supervisor, reload_siblings, single_process_problems, worker_settings

log = logging.getLogger("interlock.server")


class UnsafeBind(Exception):
    """Serving unauthenticated beyond loopback without saying so explicitly."""


def build_backends(config: LoadedConfig, resources: Resources) -> dict[str, Backend]:
    backends: dict[str, Backend] = {}
    for name, backend_config in config.backends.items():
        module, _, class_name = BACKEND_KINDS[backend_config.kind]  # type: ignore[attr-defined]
        cls = getattr(importlib.import_module(module), class_name)
        backends[name] = cls(name, backend_config, resources)
    return backends


def build_gateway(config: LoadedConfig, resources: Resources) -> Gateway:
    snapshot = build_snapshot(config, build_backends(config, resources))
    retry = config.resilience.retry
    router = Router(
        budget=RetryBudget(ratio=retry.budget_ratio, min_per_s=retry.budget_min_per_s),
        backoff_initial_s=retry.backoff_initial_s,
        backoff_max_s=retry.backoff_max_s,
    )
    check = config.resilience.health_check
    monitor = HealthMonitor(
        lambda: gateway.snapshot.targets.values(), interval_s=check.interval_s, timeout_s=check.timeout_s
    )
    gateway = Gateway(snapshot=snapshot, router=router, health=monitor)
    return gateway


def create_app(
    config: LoadedConfig,
    settings: Settings,
    server: uvicorn.Server | None = None,
    worker_metrics: WorkerMetrics | None = None,
) -> GatewayApp:
    """The ASGI app; its lifespan opens the HTTP client and starts every backend in the background
    (the port answers liveness while models load; readiness waits for them). ``worker_metrics``:
    one of several workers (``serve_workers``)."""
    http = HttpClient(max_reply_bytes=settings.max_reply_bytes)
    resources = Resources(http=http)
    gateway = build_gateway(config, resources)
    reloader = Reloader(gateway, settings.config, resources, drain_s=settings.reload_drain_s)
    reloader.workers = settings.workers
    if worker_metrics is not None:
        reloader.after_admin_reload = reload_siblings
    sighup = isinstance(server, GatewayServer) and server.reload_on_sighup
    gateway.cache = ResponseCache(config.cache, settings.redis_url)
    limits = gateway.limits = Limits(
        settings.redis_url,
        timeout_s=config.limits.redis_timeout_ms / 1000,
        heartbeat_s=config.limits.heartbeat_s,
        prefix=settings.limits_prefix,
        share=1.0 / settings.workers,  # without Redis, each worker enforces its part of a limit
    )
    fleet = gateway.fleet = Fleet(
        lambda: gateway.snapshot.targets.values(),
        gateway.health,
        redis_url=settings.redis_url,
        replica=settings.replica,
        config_hash=lambda: gateway.snapshot.hash,
    )
    access_log = access_log_from(settings.access_log)
    tracing = tracing_from(settings.traces, settings.trace_sample_ratio)
    if settings.redis_url:
        reloader.peers = ConfigPeers(gateway)

    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await http.start()
        if access_log is not None:
            access_log.start()
        await gateway.cache.start()  # type: ignore[union-attr]  # set just above
        await limits.start()
        await fleet.start()  # bounded, never raises: without Redis each replica decides alone
        if worker_metrics is not None:
            await worker_metrics.start()
        starting = asyncio.create_task(_start_backends(gateway, server))
        if settings.reload_watch is not False:
            reloader.start_watching()  # a no-op without a routing file
        if sighup:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.trigger, "SIGHUP")
        try:
            yield
        finally:
            gateway.draining = True
            starting.cancel()
            if sighup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await reloader.aclose()
            if worker_metrics is not None:
                await worker_metrics.close()
            await fleet.close()
            await asyncio.gather(*(b.close() for b in gateway.backends.values()), return_exceptions=True)
            await gateway.cache.close()  # type: ignore[union-attr]
            await limits.close()
            await http.close()
            if access_log is not None:
                access_log.stop()  # after the last request: what is queued gets written
            if tracing is not None:
                tracing.shutdown()  # exports the spans still pending

    return build_app(
        gateway,
        max_body_bytes=settings.max_body_bytes,
        lifespan=lifespan,
        reloader=reloader,
        metrics=settings.metrics,
        access_log=access_log,
        tracing=tracing,
        worker_metrics=worker_metrics,
    )


async def _start_backends(gateway: Gateway, server: uvicorn.Server | None) -> None:
    async def start(target: Target) -> None:
        try:
            await target.backend.start()
        except Exception as exc:
            log.error("backend %s failed to start: %s", target.name, exc)
            gateway.fatal = exc
            if server is not None:
                server.should_exit = True
            return
        await gateway.health.started(target)

    await asyncio.gather(*(start(t) for t in gateway.snapshot.targets.values()))
    if gateway.fatal is None:
        log.info("all backends started: %s", ", ".join(gateway.backends) or "none")
        await gateway.health.run()  # runs until the lifespan ends and cancels it


class GatewayServer(uvicorn.Server):
    """uvicorn's server, stopping in the order a load balancer needs.

    On a stop signal the gateway is flagged draining at once (readiness turns 503) while the port
    keeps taking connections for ``shutdown_delay_s``, so the balancer sees the 503 rather than a
    refused connection and moves traffic away; only then does uvicorn stop listening (a second
    signal skips the wait). Streams still open when the grace period nearly ran out end with an
    error event (``gateway.shutdown``) before uvicorn cancels them.
    """

    gateway: Gateway | None = None
    shutdown_delay_s: float = 0.0
    #: reload the routing file on SIGHUP: ``serve`` sets it (a server in a thread cannot take signals)
    reload_on_sighup: bool = False
    _stop_at: float | None = None
    _pending_signal: int | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # a signal handler: set flags only, the loop's next tick acts on them
        if self.gateway is not None:
            self.gateway.draining = True
        if self._stop_at is None and self.shutdown_delay_s > 0 and not self.should_exit:
            self._stop_at = time.monotonic() + self.shutdown_delay_s
            self._pending_signal = sig
            return
        self._stop_at = self._pending_signal = None
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if (
            self._pending_signal is not None
            and self._stop_at is not None
            and time.monotonic() >= self._stop_at
        ):
            sig, self._pending_signal = self._pending_signal, None
            super().handle_exit(sig, None)  # records it, so uvicorn re-raises it once stopped
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        grace = self.config.timeout_graceful_shutdown
        if grace is not None:
            stream_cutoff().begin(grace)
        await super().shutdown(sockets)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(
                ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None)
            )
        except OSError:
            return False


def check_bind(config: LoadedConfig, settings: Settings) -> None:
    if config.auth.keys:
        return
    if is_loopback(settings.host):
        log.warning(
            "no client keys configured: serving without authentication on %s (loopback only)", settings.host
        )
        return
    if not settings.allow_unauthenticated:
        raise UnsafeBind(
            f"refusing to serve on {settings.host} without client keys: add auth.keys to the routing "
            "file, bind to 127.0.0.1, or pass --allow-unauthenticated "
            "(INTERLOCK_ALLOW_UNAUTHENTICATED=1) to accept that anyone who can reach the port may use it"
        )
    log.warning(
        "no client keys configured and serving on %s: anyone who can reach it may use it", settings.host
    )


def uvicorn_config(settings: Settings, **overrides: Any) -> uvicorn.Config:
    """How ``serve`` runs uvicorn (tests run the app the same way); ``app`` is set once the server
    exists, since the app stops it on fatal errors."""
    options: dict[str, Any] = {
        "app": None,
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": edge_protocol(edge_limits(settings)),
        "lifespan": "on",
        "access_log": False,
        "server_header": False,
        "log_config": None,
        "timeout_graceful_shutdown": int(settings.graceful_shutdown_s),
        "timeout_keep_alive": settings.keepalive_timeout_s,
    }
    return uvicorn.Config(**{**options, **overrides})


def edge_limits(settings: Settings) -> EdgeLimits:
    return EdgeLimits(
        max_head_bytes=settings.max_header_bytes,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        body_min_bytes_per_s=settings.body_min_bytes_per_s,
        max_connections=settings.max_connections,
    )


def gateway_server(uv_config: uvicorn.Config, settings: Settings) -> GatewayServer:
    server = GatewayServer(uv_config)
    server.shutdown_delay_s = settings.shutdown_delay_s
    return server


def serve(config: LoadedConfig, settings: Settings) -> int:
    """Run until stopped; returns the process exit code."""
    check_bind(config, settings)
    if settings.workers > 1:
        return serve_workers(config, settings)
    return _serve(config, settings)


def serve_workers(config: LoadedConfig, settings: Settings) -> int:
    """``settings.workers`` processes on one socket (``gateway.workers``), until stopped."""
    problems = single_process_problems(config, settings.workers)
    if problems:
        raise ConfigError(config.source, problems)
    uv_config = uvicorn_config(settings)
    sock = uv_config.bind_socket()
    directory = tempfile.mkdtemp(prefix="interlock-workers-")  # private (0700): the metrics exchange
    _freeze_startup_objects()  # once before forking too: the workers share these pages
    log.info(
        "interlock serving %s on http://%s:%d with %d workers (models: %s)",
        config.source,
        settings.host,
        sock.getsockname()[1],
        settings.workers,
        ", ".join(config.models),
    )

    def run_worker(index: int) -> int:
        return _serve(
            config,
            worker_settings(settings, index),
            sockets=[sock],
            worker_metrics=WorkerMetrics(directory, index, settings.workers),
        )

    try:
        return Supervisor(settings.workers, run_worker).run()
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def _serve(
    config: LoadedConfig,
    settings: Settings,
    *,
    sockets: list[socket.socket] | None = None,
    worker_metrics: WorkerMetrics | None = None,
) -> int:
    uv_config = uvicorn_config(settings)
    server = gateway_server(uv_config, settings)
    server.reload_on_sighup = True
    app = create_app(config, settings, server, worker_metrics)
    server.gateway = app.gateway
    uv_config.app = app
    _freeze_startup_objects()
    if worker_metrics is None:
        log.info(
            "interlock serving %s on http://%s:%d (models: %s)",
            config.source,
            settings.host,
            settings.port,
            ", ".join(config.models),
        )
    server.run(sockets=sockets)
    gateway: Gateway = app.gateway
    return 1 if gateway.fatal is not None else 0


def _freeze_startup_objects() -> None:
    # What start-up made lives as long as the process: out of the collector's full passes, which
    # walk every tracked object; and a full pass at most every 100 (not 10) middle-generation ones:
    # thousands of connections opening in a burst made one per 25% growth, each stalling the loop
    # for tens of milliseconds. https://docs.python.org/3/library/gc.html#gc.freeze
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 100)
