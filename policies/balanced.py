"""``balanced``: minimise ``w * latency/fastest + (1 - w) * cost/cheapest`` (w = latency_weight).

Both terms are ratios to the best candidate, so at w = 0.5 being twice as slow as the
fastest weighs the same as being twice as dear as the cheapest, whatever the units.

Cost floor: the cheapest cost is floored at ``COST_FLOOR_SHARE`` of the dearest before
dividing. That keeps free (self-hosted, $0) backends from dividing by zero, and caps the
cost ratio at 1 / COST_FLOOR_SHARE, so a free backend cannot make every paid one look
infinitely dear: past a tenfold spread, latency can still win if it is weighted high enough.
If every candidate is free, the cost term is 0 and latency alone decides.
"""

from __future__ import annotations

from collections.abc import Sequence

from policies._common import demoted, explore_first, failing, fill_unknown, ms, usd_per_1k
from policies.base import BackendView, PolicyContext, Ranked, RequestFacts

COST_FLOOR_SHARE = 0.1
#: a 0ms prediction (no data anywhere, or a bogus fit) must not divide by zero either
LATENCY_FLOOR_MS = 1.0


def rank(candidates: Sequence[BackendView], request: RequestFacts, context: PolicyContext) -> list[Ranked]:
    p, m = request.prompt_tokens, request.max_tokens
    w = context.options.latency_weight
    ranked, rest = explore_first(candidates, context.rng)
    if not rest:
        return ranked
    latency = fill_unknown([c.predicted_latency_ms(p, m) for c in rest])
    cost = [c.cost_usd(p, m) for c in rest]
    lat_norm = max(min(latency), LATENCY_FLOOR_MS)
    cost_norm = max(min(cost), COST_FLOOR_SHARE * max(cost))
    lat_ratio = [x / lat_norm for x in latency]
    cost_ratio = [x / cost_norm if cost_norm > 0 else 0.0 for x in cost]
    score = [w * lr + (1 - w) * cr for lr, cr in zip(lat_ratio, cost_ratio, strict=True)]
    tie = [context.rng.random() for _ in rest]
    order = sorted(range(len(rest)), key=lambda i: (failing(rest[i]), score[i], tie[i]))
    for i in order:
        c = rest[i]
        why = (
            f"score {score[i]:.2f} (w={w:g}): {ms(latency[i])} = {lat_ratio[i]:.1f}x best, "
            f"{usd_per_1k(cost[i])} = {cost_ratio[i]:.1f}x"
        )
        ranked.append(Ranked(c.name, f"{demoted(c)}, {why}" if failing(c) else why))
    return ranked
