"""What ``GET /metrics`` exports, kept so that observing costs next to nothing.

``CounterFamily`` and ``HistogramFamily`` hold plain numbers per label tuple: an increment is an
addition, an observation a ``bisect`` and two additions, with no lock, because everything that
observes (the edge, the attempt listener) and the scrape run on the one event-loop thread.
prometheus-client's own ``Counter``/``Histogram`` take a lock and check their state on every
call, several times the cost. The scrape turns the numbers into prometheus-client metric
families (``collect``), so the text and its format are prometheus-client's.

``StateCollector`` is what is state rather than events, read from the snapshot in force at each
scrape: breaker states, in-flight and queued requests per backend, a pool's per-endpoint figures
(any backend whose ``describe()`` lists ``endpoints`` rows with a ``url``: the vLLM pool), the
config's hash and load time, reload results (from the reloader, where there is one) and
access-log drops. Reading at scrape time keeps them current without a hook on every change.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from gateway.access_log import AccessLog
from gateway.cache_store import CALL_BUCKETS
from gateway.limits_metrics import limit_families
from gateway.state import Gateway

BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


class CounterFamily:
    """``name`` (exported as ``name_total``) by label values: ``values[labels] += n`` counts, or
    ``source`` yields (labels, value) pairs at scrape time from figures kept elsewhere."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str],
        source: Callable[[], Iterable[tuple[tuple[str, ...], float]]] | None = None,
    ) -> None:
        self.name, self.documentation, self.labels = name, documentation, list(labels)
        self.values: defaultdict[tuple[str, ...], float] = defaultdict(float)
        self._source = source

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        self.values[labels] += amount

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, value in self._source() if self._source is not None else self.values.items():
            family.add_metric(labels, value)
        return family


class Histogram:
    """One histogram's buckets (not cumulative: the scrape adds them up) and sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)


class HistogramFamily:
    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], buckets: tuple[float, ...]
    ) -> None:
        self.name, self.documentation, self.labels, self.buckets = name, documentation, list(labels), buckets
        self._les = [floatToGoString(b) for b in buckets] + ["+Inf"]
        self.children: dict[tuple[str, ...], Histogram] = {}

    def child(self, labels: tuple[str, ...]) -> Histogram:
        found = self.children.get(labels)
        if found is None:
            found = self.children[labels] = Histogram(self.buckets)
        return found

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, histogram in self.children.items():
            total, buckets = 0, []
            for le, count in zip(self._les, histogram.counts, strict=True):
                total += count
                buckets.append((le, total))
            family.add_metric(labels, buckets, histogram.sum)
        return family


class Families:
    """A collector for a set of families (registered once)."""

    def __init__(self, families: Sequence[CounterFamily | HistogramFamily]) -> None:
        self.families = list(families)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.collect()


class StateCollector:
    """What is state, not events: read from the snapshot in force at each scrape."""

    def __init__(self, gateway: Gateway, access_log: AccessLog | None, reloader: object | None) -> None:
        self._gateway = gateway
        self._access = access_log
        self.reloader = reloader

    def describe(self) -> list[Metric]:
        return []  # names are fixed and unique; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        snapshot = self._gateway.snapshot
        breaker = GaugeMetricFamily(
            "interlock_breaker_state", "Circuit breaker: 0 closed, 1 half_open, 2 open", labels=["backend"]
        )
        in_flight = GaugeMetricFamily(
            "interlock_backend_in_flight", "Requests in flight to the backend", labels=["backend"]
        )
        queued = GaugeMetricFamily(
            "interlock_backend_queued",
            "Requests waiting in the backend's own queue (in-process models, a pool's servers)",
            labels=["backend"],
        )
        pool = _PoolFamilies()
        for name, target in snapshot.targets.items():
            breaker.add_metric([name], BREAKER_STATES[target.breaker.state])
            load = target.backend.load()
            in_flight.add_metric([name], max(load.in_flight, target.stats.in_flight))
            queued.add_metric([name], load.queued)
            endpoints = target.backend.describe().get("endpoints")
            if isinstance(endpoints, list):
                pool.add(name, endpoints)
        yield from (breaker, in_flight, queued, *pool.families())
        yield from limit_families(self._gateway.limits)
        info = GaugeMetricFamily(
            "interlock_config_info", "The routing config in force (its hash)", labels=["hash"]
        )
        info.add_metric([snapshot.hash], 1)
        yield info
        yield GaugeMetricFamily(
            "interlock_config_loaded_timestamp_seconds",
            "When the config in force was loaded",
            value=snapshot.loaded_at,
        )
        reloader = self.reloader or getattr(self._gateway, "reloader", None)
        results = getattr(reloader, "results", None)
        if results is not None:
            reloads = CounterMetricFamily(
                "interlock_config_reloads", "Config reloads by result", labels=["result"]
            )
            for result, count in sorted(results.items()):
                reloads.add_metric([str(result)], count)
            yield reloads
        peers = getattr(reloader, "peers", None)
        if peers is not None:
            seen = GaugeMetricFamily(
                "interlock_config_replicas",
                "Replicas seen through Redis serving each config hash (this one included)",
                labels=["hash"],
            )
            for found, count in sorted(peers.by_hash().items()):
                seen.add_metric([found], count)
            yield seen
            yield GaugeMetricFamily(
                "interlock_config_diverging_replicas",
                "Replicas seen through Redis serving a config other than this one's",
                value=len(peers.diverging()),
            )
        yield from _redis_families(getattr(self._gateway.cache, "redis", None))
        if self._access is not None:
            yield CounterMetricFamily(
                "interlock_access_log_dropped",
                "Access log lines dropped because the writer fell behind",
                value=self._access.dropped,
            )


def _redis_families(tier: Any) -> Iterator[Metric]:
    """The response cache's Redis: up or not, its commands' latency and its errors."""
    if tier is None:
        return
    yield GaugeMetricFamily(
        "interlock_redis_up",
        "1 while the cache's Redis answers (started, breaker closed)",
        value=int(tier.up),
    )
    latency = HistogramMetricFamily(
        "interlock_redis_call_duration_seconds", "The cache's Redis commands, answered or not", labels=[]
    )
    buckets, total = [], 0
    for bound, count in zip([*CALL_BUCKETS, float("inf")], tier.call_counts, strict=True):
        total += count
        buckets.append((floatToGoString(bound), total))
    latency.add_metric([], buckets, tier.call_seconds)
    yield latency
    yield CounterMetricFamily(
        "interlock_redis_errors", "The cache's Redis commands that failed or timed out", value=tier.errors
    )


#: a pool endpoint's row (``describe()["endpoints"]``) → its gauge
_POOL_GAUGES = {
    "healthy": ("interlock_vllm_endpoint_healthy", "1 while the endpoint is in rotation"),
    "in_flight": ("interlock_vllm_endpoint_in_flight", "Requests in flight to the endpoint"),
    "outstanding_tokens": (
        "interlock_vllm_endpoint_outstanding_tokens",
        "Tokens of prefill and decode the gateway has sent it and not seen finish",
    ),
    "running": ("interlock_vllm_endpoint_running", "vLLM's num_requests_running, as last scraped"),
    "waiting": ("interlock_vllm_endpoint_waiting", "vLLM's num_requests_waiting, as last scraped"),
    "kv_cache_usage": ("interlock_vllm_endpoint_kv_cache_usage_ratio", "vLLM's KV cache usage, 0-1"),
    "prefix_hit_rate": ("interlock_vllm_endpoint_prefix_hit_ratio", "Prefix cache hit rate, 0-1"),
    "scrape_age_s": ("interlock_vllm_endpoint_scrape_age_seconds", "Age of the last /metrics scrape"),
}


class _PoolFamilies:
    def __init__(self) -> None:
        labels = ["backend", "endpoint"]
        self._gauges = {
            field: GaugeMetricFamily(name, doc, labels=labels) for field, (name, doc) in _POOL_GAUGES.items()
        }
        self._served = CounterMetricFamily(
            "interlock_vllm_endpoint_served", "Requests the endpoint answered", labels=labels
        )
        self._any = False

    def add(self, backend: str, rows: list[Any]) -> None:
        for row in rows:
            if not isinstance(row, dict) or "url" not in row:
                continue
            self._any = True
            labels = [backend, str(row["url"])]
            for field, family in self._gauges.items():
                value = row.get(field)
                if isinstance(value, bool | int | float):
                    family.add_metric(labels, float(value))
            if isinstance(row.get("served"), int):
                self._served.add_metric(labels, row["served"])

    def families(self) -> list[Metric]:
        return [*self._gauges.values(), self._served] if self._any else []
