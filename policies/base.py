"""What a routing policy sees and returns.

A policy is a pure function: ``rank(candidates, request, context) -> list[Ranked]``.
It gets snapshots (no live objects, no I/O), and time and randomness come in through
``context``, so every policy is a table test. The gateway builds the snapshots from
its live per-backend stats (``gateway.stats``) and tries the backends in the order
returned; each ``Ranked`` carries the reason shown in ``x-interlock-route-reason``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

#: completed requests a backend needs before its figures are trusted over exploring it
MIN_SAMPLES = 3


@dataclass(frozen=True, slots=True)
class BackendView:
    """One candidate backend as the gateway sees it right now."""

    name: str
    #: completed requests observed (successes and failures)
    samples: int = 0
    #: time to first token: EWMA and recent quantiles, ms; None before any sample
    ttft_ms: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    #: time per output token after the first, ms (EWMA)
    tpot_ms: float | None = None
    #: TTFT model ``ttft ≈ ttft_base_ms + prompt_tokens * ttft_per_token_ms`` (fitted online)
    ttft_base_ms: float | None = None
    ttft_per_token_ms: float = 0.0
    #: failed share of recent requests, 0..1
    error_rate: float = 0.0
    in_flight: int = 0
    #: most requests it takes at once (None: unknown / unbounded)
    capacity: int | None = None
    #: USD per million tokens
    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0

    @property
    def cold(self) -> bool:
        """Too few samples to judge: worth exploring."""
        return self.samples < MIN_SAMPLES

    def predicted_ttft_ms(self, prompt_tokens: int) -> float | None:
        if self.ttft_base_ms is None:
            return self.ttft_ms
        return self.ttft_base_ms + max(0.0, self.ttft_per_token_ms) * prompt_tokens

    def predicted_latency_ms(self, prompt_tokens: int, max_tokens: int) -> float | None:
        """First token, then ``max_tokens - 1`` more at the observed pace."""
        ttft = self.predicted_ttft_ms(prompt_tokens)
        if ttft is None:
            return None
        return ttft + (self.tpot_ms or 0.0) * max(0, max_tokens - 1)

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return cost_usd(prompt_tokens, completion_tokens, self.input_per_mtok, self.output_per_mtok)


def cost_usd(
    prompt_tokens: int, completion_tokens: int, input_per_mtok: float, output_per_mtok: float
) -> float:
    """USD for one request at per-million-token prices: the one place this formula is written."""
    return (prompt_tokens * input_per_mtok + completion_tokens * output_per_mtok) / 1e6


class PolicyOptions(BaseModel):
    """A route's knobs for its policy, declared once, here: the routing YAML reads them as fields of
    the route (``RouteConfig`` extends this) and a policy reads them from its context. A new knob is
    a field here and the lines of the policy that read it; nothing in between names it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: ``weighted``: target -> weight (unlisted targets weigh 1; 0 or less: standby, listed last)
    weights: dict[str, float] = Field(default_factory=dict)
    #: ``balanced``: 0 = cheapest wins, 1 = fastest wins
    latency_weight: float = Field(default=0.5, ge=0, le=1)


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What is known of the request before it is sent."""

    #: the prompt's size in tokens (an estimate where the backend has not tokenized it)
    prompt_tokens: int
    #: the reply's budget (the request's max_tokens, or the route's default)
    max_tokens: int
    #: the latency budget for the first token: the request's x-interlock-max-ttft-ms or the route's slo
    ttft_budget_ms: float | None = None


_DEFAULT_OPTIONS = PolicyOptions()


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """Per-call inputs that are not about one backend: randomness and the route's options."""

    rng: random.Random = field(default_factory=random.Random)
    options: PolicyOptions = _DEFAULT_OPTIONS


@dataclass(frozen=True, slots=True)
class Ranked:
    name: str
    reason: str


Policy = Callable[[Sequence[BackendView], RequestFacts, PolicyContext], list[Ranked]]
