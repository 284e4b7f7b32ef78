"""Helpers shared by the data-driven policies (cost, latency, balanced, slo).

Kept private: policy modules expose only ``rank``; these pieces exist so that cold start,
error demotion and reason formatting behave the same way in every policy.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from policies.base import BackendView, Ranked

#: error share at which a backend is listed after the healthy ones (the breaker is the hard cut)
DEMOTE_ERROR_RATE = 0.5


def failing(backend: BackendView) -> bool:
    # One failure is no verdict (a demoted backend gets little traffic to redeem itself with, and
    # the breaker has a minimum number of calls for the same reason): it takes two.
    failures = backend.error_rate * backend.samples
    return backend.error_rate >= DEMOTE_ERROR_RATE and failures >= 1.5


def explore_first(
    candidates: Sequence[BackendView], rng: random.Random
) -> tuple[list[Ranked], list[BackendView]]:
    """Pick at most one cold, idle, healthy backend to try first; return it and the rest.

    Idle only: a cold backend that already has a request in flight is being sampled, so
    sending it more before that one finishes would be a stampede. A cold backend that has
    already failed half its few tries is not explored: a live request is a poor probe, and it
    is still listed (last), so fallbacks keep sampling it.
    """
    eligible = [i for i, c in enumerate(candidates) if c.cold and c.in_flight == 0 and not failing(c)]
    if not eligible:
        return [], list(candidates)
    pick = rng.choice(eligible)
    chosen = candidates[pick]
    noun = "sample" if chosen.samples == 1 else "samples"
    rest = [c for i, c in enumerate(candidates) if i != pick]
    return [Ranked(chosen.name, f"exploring: {chosen.samples} {noun}")], rest


def fill_unknown(values: Sequence[float | None]) -> list[float]:
    """Optimistic figures: an unknown prediction counts as the best known one (0 if none is).

    Optimistic so a backend without data is not starved; exploration already bounds how
    much traffic that optimism can cost.
    """
    best = min((v for v in values if v is not None), default=0.0)
    return [best if v is None else v for v in values]


def ms(value: float) -> str:
    return f"{value:.0f}ms"


def usd_per_1k(cost_usd: float) -> str:
    """Per-request costs are tiny; per thousand requests reads better in a header."""
    per_1k = cost_usd * 1000
    if per_1k == 0:
        return "$0/1k req"
    return f"${per_1k:.2f}/1k req" if per_1k >= 0.01 else f"${per_1k:.2g}/1k req"


def demoted(backend: BackendView) -> str:
    return f"error rate {backend.error_rate:.0%} (demoted)"
