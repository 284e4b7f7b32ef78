"""What ``GET /status`` shows, as data: ``StatusReport.data()`` is the body of ``/status.json``.

Two sources. State is read from the snapshot in force at each read, as ``/metrics`` reads it:
breakers, health checks, load, what each backend says of itself (``describe()``: a vLLM pool's
endpoints), the config's hash and the reloader's last result, the order a typical request would
take per route (``Router.plan``, as ``/admin/routes``). Events are kept by ``StatusRecorder``,
one more attempt listener (``gateway.attempts``) and a request listener of ``gateway.metrics``'
edge: rolling 1- and 5-minute figures (``gateway.status_windows``), each backend's last error,
and the last ``ERRORS_KEPT`` requests that went wrong, with their request ids.

Two views of other parts: ``ReplicaDirectory`` (``FleetReplicas``: with Redis, the other replicas
and their config hashes, from the fleet's heartbeats) and ``LimitsView`` (``GatewayLimits``:
whether limits are set and where their counters live).
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from starlette.types import Scope

from backends.errors import InterlockError
from gateway import __version__
from gateway.admin_query import AdminRoutesQuery
from gateway.middleware import REQUEST_ID_KEY
from gateway.snapshot import Route, Target
from gateway.state import Gateway
from gateway.status_windows import BIN_BOUNDS, WINDOWS, Windows

if TYPE_CHECKING:
    from gateway.attempts import Attempt
    from gateway.metrics_edge import Exchange
    from gateway.reload import Reloader

#: the request errors the page lists, newest first
ERRORS_KEPT = 50
#: throttled keys listed at most (the count says how many there are)
THROTTLED_SHOWN = 20
_MESSAGE_CHARS = 300


# -- seams ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Replica:
    id: str
    config_hash: str
    version: str
    #: when it last said it was alive (wall clock)
    seen_at: float


class ReplicaDirectory(Protocol):
    def replicas(self) -> list[Replica]:
        """Every replica known, this one included."""


class FleetReplicas:
    """The replicas the fleet's last heartbeat saw (``gateway.fleet``), each with the config hash
    it serves; without Redis, this one alone. Other replicas' versions are not shared: ""."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def replicas(self) -> list[Replica]:
        fleet, mine, now = self._gateway.fleet, self._gateway.snapshot.hash, time.time()
        if fleet is None:
            return [Replica(default_replica_id(), mine, __version__, now)]
        return [
            Replica(r.id, mine, __version__, now)
            if r.id == fleet.id
            else Replica(r.id, r.config_hash, "", now - r.seen_s_ago)
            for r in fleet.live_replicas()
        ]


@dataclass(frozen=True, slots=True)
class ThrottledKey:
    key: str
    #: the limit it hit (``rpm``, ``tpm``, a route's budget...)
    limit: str
    retry_in_s: float


@dataclass(frozen=True, slots=True)
class LimitsStatus:
    configured: bool
    #: where the limits' counters live: ``none``, ``memory``, ``redis`` or ``local (redis down)``
    mode: str
    throttled: list[ThrottledKey] = field(default_factory=list)


class LimitsView(Protocol):
    def limits_status(self) -> LimitsStatus: ...


class GatewayLimits:
    """Whether the routing file sets limits, where their counters live, and the scopes (a key, or
    a key and a model) refused and still waiting (``gateway.limits``)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def limits_status(self) -> LimitsStatus:
        limits = self._gateway.limits
        if limits is None or not self._gateway.snapshot.config.limits.keys:
            return LimitsStatus(configured=False, mode="none")
        throttled = [ThrottledKey(scope, kind, round(wait, 3)) for scope, kind, wait in limits.throttled()]
        return LimitsStatus(configured=True, mode=limits.status(), throttled=throttled)


def default_replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# -- events --------------------------------------------------------------------------------------


class StatusRecorder:
    """An attempt listener and a request listener feeding the rolling windows and the error log."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.windows = Windows(clock)
        self._backends, self._routes = self.windows.backends, self.windows.routes
        #: dicts as ``/status.json`` lists them, newest last
        self.errors: deque[dict[str, Any]] = deque(maxlen=ERRORS_KEPT)

    # AttemptListener: everything at the end, one call per attempt (a stream's first token is
    # counted in the window of its end: seconds late for long streams, and half the cost)
    def attempt_started(self, attempt: Attempt) -> None:
        return None

    def attempt_answered(self, attempt: Attempt) -> None:
        return None

    def attempt_ended(self, attempt: Attempt) -> None:
        outcome = attempt.outcome
        name = attempt.target.name
        f = self._backends.get(name) or self.windows.backend(name)
        if outcome == "abandoned":
            error = attempt.error
            if isinstance(error, InterlockError) and error.busy:  # said "full", not broken: noted
                f.last_error, f.last_error_at = _describe(error), time.time()
            return
        now = self._clock()
        if now >= f.next_mark:
            f.mark(now)
        if outcome == "ok":
            f.ok += 1
            usage = attempt.usage
            if usage is not None:
                f.tokens += usage.completion_tokens
        else:
            f.failed += 1
            f.last_error, f.last_error_at = _describe(attempt.error), time.time()
        ttft = attempt.ttft_s
        if ttft is not None:
            f.bins[bisect_left(BIN_BOUNDS, ttft)] += 1

    # gateway.metrics' request listener
    def request_ended(
        self,
        ex: Exchange,
        scope: Scope,
        route: str,
        backend: str,
        status: int,
        errored: bool,
        duration_s: float,
        cached: str | None,
        reason: str | None,
    ) -> None:
        f = self._routes.get(route) or self.windows.route(route)
        now = self._clock()
        if now >= f.next_mark:
            f.mark(now)
        f.requests += 1
        if cached == "hit":
            f.cache_hits += 1
        if reason is not None and reason.startswith("fallback "):
            f.fallbacks += 1
        if status < 400 and not errored:
            f.bins[bisect_left(BIN_BOUNDS, duration_s)] += 1
            if not ex.failures:
                return
        elif status == 429:
            f.limited += 1
        elif errored or status >= 500:
            f.errors += 1
        else:
            return  # the client's mistake: not the gateway's error
        self.errors.append(
            {
                "at": time.time() - duration_s,
                "request_id": scope.get(REQUEST_ID_KEY),
                "route": route,
                "backend": backend,
                "status": status,
                "message": _request_error(ex, status, errored),
            }
        )


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, InterlockError):
        return f"{exc.code or exc.type}: {exc.message}"[:_MESSAGE_CHARS]
    return type(exc).__name__


def _request_error(ex: Exchange, status: int, errored: bool) -> str:
    """The message the client got (from the error body or event), and what failed on the way."""
    message = None
    body = ex.last
    if errored:
        at = (ex.prev + body).find(b'data: {"error"')
        body = (ex.prev + body)[at + 6 :].split(b"\n", 1)[0] if at >= 0 else b""
    if status >= 400 or errored:
        try:
            message = orjson.loads(body)["error"]["message"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            message = None
    if message is None and status >= 400:
        message = _describe(ex.error) if ex.error is not None else f"HTTP {status}"
    if ex.failures:
        tried = "; ".join(ex.failures)
        message = f"{message} (after {tried})" if message else f"answered after {tried}"
    return str(message)[:_MESSAGE_CHARS]


# -- the report ----------------------------------------------------------------------------------


class StatusReport:
    """Builds ``/status.json``'s body from the gateway in force and the recorder's figures."""

    def __init__(
        self,
        gateway: Gateway,
        recorder: StatusRecorder,
        *,
        reloader: Reloader | None = None,
        replicas: ReplicaDirectory | None = None,
        limits: LimitsView | None = None,
        replica_id: str | None = None,
        metrics: bool = True,
    ) -> None:
        self.gateway = gateway
        self.recorder = recorder
        self.reloader = reloader
        fleet = gateway.fleet
        self.replica_id = replica_id or (fleet.id if fleet is not None else default_replica_id())
        self.replicas = replicas or FleetReplicas(gateway)
        self.limits = limits or GatewayLimits(gateway)
        #: False: the edge is not observed, so there are no per-route figures or error log
        self.metrics = metrics
        self._typical = AdminRoutesQuery().facts()

    def data(self) -> dict[str, Any]:
        gateway, snapshot = self.gateway, self.gateway.snapshot
        wall, mono = time.time(), self.recorder.windows.clock()
        backends = {name: self._backend(t, wall, mono) for name, t in snapshot.targets.items()}
        for target in self.reloader.draining if self.reloader is not None else ():
            backends[f"{target.name}~draining"] = self._backend(target, wall, mono, draining=True)
        routes = {name: self._route(route, mono) for name, route in snapshot.routes.items()}
        replicas = [
            {**asdict(r), "this": r.id == self.replica_id, "hash_differs": r.config_hash != snapshot.hash}
            for r in self.replicas.replicas()
        ]
        limits = self.limits.limits_status()
        throttled = [asdict(t) for t in limits.throttled]
        errors = list(self.recorder.errors)
        errors.reverse()
        layout = [
            [(k, [e.get("url") for e in b.get("endpoints", ())]) for k, b in backends.items()],
            [(k, len(r["order"])) for k, r in routes.items()],
            [r["id"] for r in replicas],
            self.metrics,
        ]
        return {
            "now": wall,
            "layout": hashlib.sha256(orjson.dumps(layout)).hexdigest()[:16],
            "gateway": {
                "version": __version__,
                "replica": self.replica_id,
                "started_at": gateway.started_at,
                "uptime_s": wall - gateway.started_at,
                "draining": gateway.draining,
                "cache": gateway.cache.status() if gateway.cache is not None else "off",
                "metrics": self.metrics,
                "config": {
                    "hash": snapshot.hash,
                    "source": snapshot.config.source,
                    "loaded_at": snapshot.loaded_at,
                },
                "reload": self._reload(),
            },
            "replicas": replicas,
            "backends": backends,
            "routes": routes,
            "limits": {
                "configured": limits.configured,
                "mode": limits.mode,
                "throttled_count": len(throttled),
                "throttled": throttled[:THROTTLED_SHOWN],
            },
            "errors": errors,
        }

    def _reload(self) -> dict[str, Any]:
        r = self.reloader
        if r is None:  # no reloader (an app built without one): nothing to say, in the same shape
            return {"watching": False, "last_status": None, "last_attempt_at": None, "last_error": None}
        last = r.last_result
        return {
            "watching": r.watching,
            "last_status": last.status if last is not None else None,
            "last_attempt_at": r.last_attempt_at,
            "last_error": r.last_error,
            "results": dict(r.results),
        }

    def _backend(self, target: Target, wall: float, mono: float, *, draining: bool = False) -> dict[str, Any]:
        health, breaker = self.gateway.health, target.breaker.state
        if draining:
            state = "draining"
        elif not health.has_started(target.name):
            state = "starting"
        elif breaker != "closed":
            state = breaker
        elif target.healthy is False:
            state = "unhealthy"
        else:
            state = "healthy" if target.healthy else "unchecked"
        checked = health.last_checked(target.name)
        load = target.backend.load()
        figures = self.recorder.windows.backend(target.name)
        described = target.backend.describe()
        row: dict[str, Any] = {
            "name": target.name,
            "kind": target.backend.kind,
            "state": state,
            "retry_in_s": target.breaker.retry_in() if breaker == "open" else None,
            "health": {
                "ok": target.healthy,
                "reason": target.health_reason or None,
                "checked_at": wall - (mono - checked) if checked is not None else None,
            },
            "in_flight": max(load.in_flight, target.stats.in_flight),
            "queued": load.queued,
            "last_error": figures.last_error,
            "last_error_at": figures.last_error_at,
            "detail": " ".join(
                f"{k}={v}" for k, v in described.items() if isinstance(v, str | int | float | bool)
            )
            or None,
        }
        for label, seconds in WINDOWS.items():
            row[label] = figures.read(mono, seconds)
        endpoints = described.get("endpoints")
        if isinstance(endpoints, list):
            row["endpoints"] = [_endpoint(e) for e in endpoints if isinstance(e, dict) and "url" in e]
        return row

    def _route(self, route: Route, mono: float) -> dict[str, Any]:
        figures = self.recorder.windows.route(route.name) if self.metrics else None
        row: dict[str, Any] = {
            "policy": route.policy,
            "cached": route.cache is not None,
            "order": [
                {"backend": c.target.name, "reason": c.reason}
                for c in self.gateway.router.plan(route, self._typical)
            ],
        }
        for label, seconds in WINDOWS.items():
            row[label] = figures.read(mono, seconds) if figures is not None else None
            if row[label] is not None and route.cache is None:
                row[label]["cache_hit_rate"] = None  # nothing to hit
        return row


def _endpoint(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("url", "healthy", "reason", "in_flight", "running", "waiting", "kv_cache_usage")
    return {
        **{k: row.get(k) for k in keys},
        "prefix_hit_rate": row.get("prefix_hit_rate"),
        "scrape_age_s": row.get("scrape_age_s"),
    }
