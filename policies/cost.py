"""``cost``: the cheapest expected cost for this request first; failing backends after healthy ones."""

from __future__ import annotations

from collections.abc import Sequence

from policies._common import demoted, explore_first, failing, fill_unknown, usd_per_1k
from policies.base import BackendView, PolicyContext, Ranked, RequestFacts


def rank(candidates: Sequence[BackendView], request: RequestFacts, context: PolicyContext) -> list[Ranked]:
    p, m = request.prompt_tokens, request.max_tokens
    ranked, rest = explore_first(candidates, context.rng)
    # max_tokens stands in for the completion: it is the most this request can cost.
    cost = [c.cost_usd(p, m) for c in rest]
    latency = fill_unknown([c.predicted_latency_ms(p, m) for c in rest])
    tie = [context.rng.random() for _ in rest]
    order = sorted(range(len(rest)), key=lambda i: (failing(rest[i]), cost[i], latency[i], tie[i]))
    first_healthy = True
    for i in order:
        c, price = rest[i], f"{usd_per_1k(cost[i])} est."
        if failing(c):
            ranked.append(Ranked(c.name, f"{demoted(c)}: {price}"))
        else:
            ranked.append(Ranked(c.name, f"cheapest healthy: {price}" if first_healthy else price))
            first_healthy = False
    return ranked
