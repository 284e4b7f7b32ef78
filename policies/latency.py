"""``latency``: the lowest predicted end-to-end latency for this request's size first."""

from __future__ import annotations

from collections.abc import Sequence

from policies._common import demoted, explore_first, failing, fill_unknown, ms
from policies.base import BackendView, PolicyContext, Ranked, RequestFacts


def rank(candidates: Sequence[BackendView], request: RequestFacts, context: PolicyContext) -> list[Ranked]:
    p, m = request.prompt_tokens, request.max_tokens
    ranked, rest = explore_first(candidates, context.rng)
    raw = [c.predicted_latency_ms(p, m) for c in rest]
    latency = fill_unknown(raw)
    # Equal predictions: the cheaper one, then chance (so replicas do not herd).
    cost = [c.cost_usd(p, m) for c in rest]
    tie = [context.rng.random() for _ in rest]
    order = sorted(range(len(rest)), key=lambda i: (failing(rest[i]), latency[i], cost[i], tie[i]))
    first_healthy = True
    for i in order:
        c = rest[i]
        figure = f"predicted {ms(latency[i])}" if raw[i] is not None else f"no data, assumed {ms(latency[i])}"
        if failing(c):
            ranked.append(Ranked(c.name, f"{demoted(c)}, {figure}"))
        else:
            ranked.append(Ranked(c.name, f"fastest: {figure}" if first_healthy else figure))
            first_healthy = False
    return ranked
