"""``slo``: the cheapest backend predicted to meet the TTFT budget; if none can, the fastest.

Order: backends predicted to meet ``ttft_budget_ms`` by cost (then predicted latency), then
the rest by predicted TTFT, since a late first token is better late by less. Failing backends
follow the healthy ones in the same two tiers. Without a budget this is the ``cost`` policy.
"""

from __future__ import annotations

from collections.abc import Sequence

from policies import cost as cost_policy
from policies._common import demoted, explore_first, failing, fill_unknown, ms, usd_per_1k
from policies.base import BackendView, PolicyContext, Ranked, RequestFacts


def rank(candidates: Sequence[BackendView], request: RequestFacts, context: PolicyContext) -> list[Ranked]:
    budget = request.ttft_budget_ms
    if budget is None:
        return cost_policy.rank(candidates, request, context)
    p, m = request.prompt_tokens, request.max_tokens
    ranked, rest = explore_first(candidates, context.rng)
    raw = [c.predicted_ttft_ms(p) for c in rest]
    ttft = fill_unknown(raw)
    latency = fill_unknown([c.predicted_latency_ms(p, m) for c in rest])
    cost = [c.cost_usd(p, m) for c in rest]
    meets = [t <= budget for t in ttft]
    tie = [context.rng.random() for _ in rest]

    def key(i: int) -> tuple[bool, bool, float, float, float]:
        if meets[i]:
            return (failing(rest[i]), False, cost[i], latency[i], tie[i])
        return (failing(rest[i]), True, ttft[i], cost[i], tie[i])

    order = sorted(range(len(rest)), key=key)
    any_healthy_meets = any(meets[i] and not failing(rest[i]) for i in order)
    first_meeting = first_missing = True
    for i in order:
        c = rest[i]
        figure = f"predicted ttft {ms(ttft[i])}" + (" (assumed)" if raw[i] is None else "")
        if failing(c):
            why = f"{demoted(c)}, {figure}"
        elif meets[i]:
            extra = "cheapest such" if first_meeting else f"{usd_per_1k(cost[i])} est."
            why = f"{figure} <= budget {ms(budget)}, {extra}"
            first_meeting = False
        elif not any_healthy_meets and first_missing:
            why = f"none predicted to meet {ms(budget)}: fastest first, {figure}"
            first_missing = False
        else:
            why = f"{figure} > budget {ms(budget)}"
        ranked.append(Ranked(c.name, why))
    return ranked
