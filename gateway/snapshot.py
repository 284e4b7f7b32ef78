"""The routing state in force: one immutable snapshot of the routing file.

A ``Snapshot`` holds the routes clients can name, the targets (each backend with its live
stats and circuit breaker), the client keys and the parsed config, with a content hash.
Everything that serves a request reads ``Gateway.snapshot`` (``gateway.state``) once and
keeps that snapshot for the request's whole life: auth, the hot path, ``/v1/models``, admin
and health. Replacing it is one assignment; ``build_snapshot(config, backends, previous)``
carries over, by name, every target whose backend is the same object as before, so what did
not change keeps its connections, loaded model, breaker state and latency figures.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import orjson

from backends.base import Backend, Price, Usage
from backends.errors import InterlockError
from gateway.breaker import CircuitBreaker
from gateway.cache import CacheConfig
from gateway.config import ClientKey, LoadedConfig
from gateway.errors import ModelNotFound
from gateway.stats import BackendStats
from policies.base import PolicyOptions, cost_usd


@dataclass(slots=True, eq=False)
class Target:
    """A backend as the router sees it: the backend plus its live state in this process."""

    backend: Backend
    stats: BackendStats
    breaker: CircuitBreaker
    price: Price = field(default_factory=Price)
    max_in_flight: int | None = None
    #: the last active health check's verdict (None: not checked yet)
    healthy: bool | None = None
    health_reason: str = ""
    #: an upstream 429 said when to come back: skipped until then (monotonic), circuit untouched
    limited_until: float = 0.0
    limited_by: InterlockError | None = None
    #: the backend's name (a plain attribute: it is read several times per request)
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.backend.name

    def full(self) -> bool:
        """At its in-flight cap, or its own queue is full: a call now would only be refused."""
        if self.max_in_flight is not None and self.stats.in_flight >= self.max_in_flight:
            return True
        return self.backend.load().full

    def cost_usd(self, usage: Usage) -> float:
        return cost_usd(
            usage.prompt_tokens,
            usage.completion_tokens,
            self.price.input_per_mtok,
            self.price.output_per_mtok,
        )


@dataclass(frozen=True, slots=True)
class Route:
    """A model name clients send, and where its requests may go."""

    name: str
    targets: tuple[Target, ...]
    fallback: tuple[Target, ...] = ()
    policy: str = "ordered"
    #: the policy's knobs, as one object from the routing file to the policy
    options: PolicyOptions = field(default_factory=PolicyOptions)
    ttft_slo_ms: float | None = None
    attempts: int = 3
    hedge: bool = False
    #: the route's ``cache:`` as written (None: its answers are not cached)
    cache: CacheConfig | None = None

    def candidates(self) -> tuple[Target, ...]:
        return self.targets + self.fallback


class KeyTable:
    """Client keys by SHA-256, matched in constant time (no early exit, every key compared)."""

    def __init__(self, keys: list[ClientKey]) -> None:
        self._keys = [(bytes.fromhex(k.sha256), k) for k in keys]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def match(self, token: bytes) -> ClientKey | None:
        digest = hashlib.sha256(token).digest()
        found = None
        for stored, key in self._keys:
            if hmac.compare_digest(stored, digest) and token:
                found = key
        return found


def may_use(key: ClientKey | None, model: str) -> bool:
    """Whether a request with ``key`` (None: no keys configured) may use ``model``."""
    return key is None or key.models is None or model in key.models


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: LoadedConfig
    routes: Mapping[str, Route]
    targets: Mapping[str, Target]
    keys: KeyTable
    #: sha256 of the parsed config (secrets masked): what replicas compare to see a divergence
    hash: str
    #: wall-clock time it was built
    loaded_at: float

    def route(self, model: str) -> Route:
        route = self.routes.get(model)
        if route is None:
            raise ModelNotFound(model)
        return route


def config_hash(config: LoadedConfig) -> str:
    document = {
        "auth": config.auth.model_dump(mode="json"),
        "backends": {name: c.model_dump(mode="json") for name, c in config.backends.items()},
        "models": {name: r.model_dump(mode="json") for name, r in config.models.items()},
        "resilience": config.resilience.model_dump(mode="json"),
        "limits": config.limits.model_dump(mode="json"),
    }
    return hashlib.sha256(orjson.dumps(document, option=orjson.OPT_SORT_KEYS)).hexdigest()


def build_snapshot(
    config: LoadedConfig,
    backends: Mapping[str, Backend],
    previous: Snapshot | None = None,
    *,
    known_hash: str | None = None,
) -> Snapshot:
    """The snapshot of ``config`` served by ``backends`` (one per configured backend name); a
    target of ``previous`` whose backend object is reused keeps its live state. ``known_hash``:
    ``config_hash(config)``, when the caller has worked it out already (a reload, off the loop)."""
    resilience = config.resilience
    kept = previous.targets if previous is not None else {}
    targets: dict[str, Target] = {}
    for name, backend in backends.items():
        old = kept.get(name)
        backend_config = config.backends[name]
        price = getattr(backend_config, "price", Price())
        max_in_flight = getattr(backend_config, "max_in_flight", None)
        if old is not None and old.backend is backend:
            old.price, old.max_in_flight = price, max_in_flight
            targets[name] = old
        else:
            targets[name] = Target(
                backend=backend,
                stats=BackendStats(name),
                breaker=CircuitBreaker(name, resilience.breaker),
                price=price,
                max_in_flight=max_in_flight,
            )
    routes = {
        model: Route(
            name=model,
            targets=tuple(targets[n] for n in route.targets),
            fallback=tuple(targets[n] for n in route.fallback),
            policy=route.policy,
            options=route,
            ttft_slo_ms=route.slo.ttft_ms if route.slo else None,
            attempts=route.attempts or resilience.retry.attempts,
            hedge=route.hedge,
            cache=route.cache,
        )
        for model, route in config.models.items()
    }
    return Snapshot(
        config=config,
        routes=routes,
        targets=targets,
        keys=KeyTable(config.auth.keys),
        hash=config_hash(config) if known_hash is None else known_hash,
        loaded_at=time.time(),
    )
