"""Merging workers' expositions: counters and histograms add up, gauges combine by meaning."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics_workers import merge

ONE = """# HELP interlock_requests_total Inference requests by outcome
# TYPE interlock_requests_total counter
interlock_requests_total{route="m",status_class="2xx"} 3.0
# HELP interlock_request_duration_seconds Duration
# TYPE interlock_request_duration_seconds histogram
interlock_request_duration_seconds_bucket{route="m",le="0.1"} 2.0
interlock_request_duration_seconds_bucket{route="m",le="+Inf"} 3.0
interlock_request_duration_seconds_count{route="m"} 3.0
interlock_request_duration_seconds_sum{route="m"} 0.25
# HELP interlock_breaker_state Breaker
# TYPE interlock_breaker_state gauge
interlock_breaker_state{backend="up"} 0.0
# HELP interlock_backend_in_flight In flight
# TYPE interlock_backend_in_flight gauge
interlock_backend_in_flight{backend="up"} 2.0
# HELP interlock_redis_up Redis
# TYPE interlock_redis_up gauge
interlock_redis_up 1.0
"""
TWO = (
    ONE.replace("} 3.0", "} 5.0")
    .replace('backend="up"} 0.0', 'backend="up"} 2.0')
    .replace("interlock_redis_up 1.0", "interlock_redis_up 0.0")
    .replace(
        'status_class="2xx"} 5.0',
        'status_class="2xx"} 5.0\ninterlock_requests_total{route="m",status_class="5xx"} 1.0',
    )
)


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_counters_and_histograms_add_up_and_gauges_combine_by_meaning() -> None:
    merged = _samples(merge({0: ONE, 1: TWO}))
    assert merged["interlock_requests_total", (("route", "m"), ("status_class", "2xx"))] == 8
    assert merged["interlock_requests_total", (("route", "m"), ("status_class", "5xx"))] == 1
    assert merged["interlock_request_duration_seconds_bucket", (("le", "+Inf"), ("route", "m"))] == 8
    assert merged["interlock_request_duration_seconds_sum", (("route", "m"),)] == 0.5
    assert merged["interlock_breaker_state", (("backend", "up"),)] == 2  # open in any worker: open
    assert merged["interlock_backend_in_flight", (("backend", "up"),)] == 4  # loads add up
    assert merged["interlock_redis_up", ()] == 0  # the worst worker's
    assert merged["interlock_workers", ()] == 2
    assert merged["interlock_worker_requests_total", (("worker", "0"),)] == 3
    assert merged["interlock_worker_requests_total", (("worker", "1"),)] == 6


def test_one_worker_merges_to_itself() -> None:
    alone = _samples(merge({0: ONE}))
    assert {k: v for k, v in alone.items() if not k[0].startswith("interlock_worker")} == _samples(
        ONE.encode()
    )
