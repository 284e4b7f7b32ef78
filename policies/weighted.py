"""``weighted``: a random order where each backend's chance of going first is its weight share."""

from __future__ import annotations

import math
from collections.abc import Sequence

from policies.base import BackendView, PolicyContext, Ranked, RequestFacts


def rank(candidates: Sequence[BackendView], request: RequestFacts, context: PolicyContext) -> list[Ranked]:
    weights = context.options.weights
    weight = {c.name: weights.get(c.name, 1.0) for c in candidates}
    # ``not w > 0`` also catches NaN: anything without a positive weight is a fallback only.
    live = [c for c in candidates if weight[c.name] > 0]
    spare = [c for c in candidates if not weight[c.name] > 0]
    total = sum(weight[c.name] for c in live)
    # Efraimidis-Spirakis: sorting by u ** (1 / w) descending is weighted sampling without
    # replacement in one pass. Compared as log(u) / w so tiny weights do not underflow to 0;
    # 1 - random() lies in (0, 1], so the log is defined.
    keys = [math.log(1.0 - context.rng.random()) / weight[c.name] for c in live]
    order = sorted(range(len(live)), key=lambda i: keys[i], reverse=True)
    ranked = [
        Ranked(live[i].name, f"weighted draw: weight {weight[live[i].name]:g} of {total:g}") for i in order
    ]
    # Kept in target order: a zero weight means "standby", and standbys have no preference.
    ranked += [Ranked(c.name, f"weight {weight[c.name]:g}: listed last") for c in spare]
    return ranked
