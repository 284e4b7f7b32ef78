"""``least_busy``: the backend with the smallest share of its capacity in use goes first."""

from __future__ import annotations

from collections.abc import Sequence

from policies.base import BackendView, PolicyContext, Ranked, RequestFacts


def _load(c: BackendView) -> float:
    # Without a (positive) capacity there is nothing to divide by: raw in-flight count it is.
    return c.in_flight / c.capacity if c.capacity and c.capacity > 0 else float(c.in_flight)


def _describe(c: BackendView) -> str:
    if c.capacity and c.capacity > 0:
        return f"{c.in_flight}/{c.capacity} in flight"
    return f"{c.in_flight} in flight, capacity unknown"


def rank(candidates: Sequence[BackendView], request: RequestFacts, context: PolicyContext) -> list[Ranked]:
    # Random tie-break: replicas that see the same loads would otherwise all pick the same
    # backend, and the herd would make it the busiest one.
    tie = [context.rng.random() for _ in candidates]
    order = sorted(range(len(candidates)), key=lambda i: (_load(candidates[i]), tie[i]))
    return [
        Ranked(candidates[i].name, ("least busy: " if pos == 0 else "") + _describe(candidates[i]))
        for pos, i in enumerate(order)
    ]
