"""The limits' figures for ``GET /metrics``, read from ``gateway.limits.Limits`` at scrape time.

``interlock_limit_decisions_total{kind, tier, result}``: every check of every request, by kind
(rpm, tpm, usd, parallel), where it was decided (``memory``: no Redis; ``redis``; in an outage the
scope's ``on_redis_failure``: ``local``, ``open``, ``closed``) and its verdict (``admitted`` or
``refused``; a request is refused when any of its checks is). Bounded: 4 x 5 x 2 series at most,
never a key or scope name. The counts are plain ints that ``Limits`` adds to as it decides.

``interlock_limit_settlements_lost_total``: settlement steps (a refund, a slot's release) that never
reached Redis: what was reserved stays taken until the lease's TTL, so a rise means limits that
refuse more than they should for a while (the safe side).

``interlock_limits_tier{tier}``: 1 for the tier deciding now: ``memory`` (no Redis), ``redis``, or
``fallback`` (Redis configured but not answering: each scope's ``on_redis_failure``).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.limits import Limits

TIERS = ("memory", "redis", "fallback")


def limit_families(limits: Limits | None) -> Iterator[Metric]:
    """The limits' metric families; none for a gateway without limits."""
    if limits is None:
        return
    decisions = CounterMetricFamily(
        "interlock_limit_decisions",
        "Limit checks by kind, where they were decided (memory, redis, or in a Redis outage the "
        "scope's on_redis_failure: local, open, closed) and result (admitted, refused)",
        labels=["kind", "tier", "result"],
    )
    for (kind, where, result), count in sorted(limits.decisions.items()):
        decisions.add_metric([kind, where, result], count)
    yield decisions
    if limits.redis is not None:
        lost = CounterMetricFamily(
            "interlock_limit_settlements_lost",
            "Limit settlement steps (refunds, slot releases) that never reached Redis; what they "
            "held is freed by the lease's TTL",
        )
        lost.add_metric([], limits.redis.settles_lost)
        yield lost
    now = limits.tier()
    tier = GaugeMetricFamily(
        "interlock_limits_tier",
        "1 for the tier deciding limits now: memory (no Redis), redis, or fallback (Redis not answering)",
        labels=["tier"],
    )
    for name in TIERS:
        tier.add_metric([name], 1.0 if name == now else 0.0)
    yield tier
