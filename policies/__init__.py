"""Routing policies: pure functions that rank a route's candidates."""

from policies import balanced, cost, latency, least_busy, ordered, slo, weighted
from policies.base import Policy

POLICIES: dict[str, Policy] = {
    "ordered": ordered.rank,
    "weighted": weighted.rank,
    "least_busy": least_busy.rank,
    "cost": cost.rank,
    "latency": latency.rank,
    "balanced": balanced.rank,
    "slo": slo.rank,
}
