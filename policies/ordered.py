"""``ordered``: try the route's targets in the order the operator wrote them."""

from __future__ import annotations

from collections.abc import Sequence

from policies.base import BackendView, PolicyContext, Ranked, RequestFacts


def rank(candidates: Sequence[BackendView], request: RequestFacts, context: PolicyContext) -> list[Ranked]:
    return [Ranked(c.name, f"position {i} in targets") for i, c in enumerate(candidates, start=1)]
