"""The query of ``GET /admin/routes``, validated like an inference body: a value out of range or
not a number is a 400 naming the parameter, never a 500.

``interlock routes`` checks its flags with the same model before it asks the gateway.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.errors import InvalidRequest
from policies.base import RequestFacts

MAX_TOKENS = 10_000_000
#: an hour: a first-token budget past it means nothing
MAX_TTFT_MS = 3_600_000


class AdminRoutesQuery(BaseModel):
    """The request the ranking is shown for; parameters it does not know are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    prompt_tokens: int = Field(default=500, ge=0, le=MAX_TOKENS)
    max_tokens: int = Field(default=256, ge=1, le=MAX_TOKENS)
    ttft_ms: float | None = Field(default=None, gt=0, lt=MAX_TTFT_MS, allow_inf_nan=False)

    def facts(self) -> RequestFacts:
        return RequestFacts(
            prompt_tokens=self.prompt_tokens, max_tokens=self.max_tokens, ttft_budget_ms=self.ttft_ms
        )


def parse_admin_query(params: Mapping[str, str]) -> RequestFacts:
    """``RequestFacts`` from a query string's parameters; ``InvalidRequest`` with ``param`` set."""
    return admin_routes_query(params).facts()


def admin_routes_query(params: Mapping[str, object]) -> AdminRoutesQuery:
    try:
        return AdminRoutesQuery.model_validate(dict(params))
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = str(first["loc"][0]) if first["loc"] else None
        more = len(exc.errors()) - 1
        raise InvalidRequest(
            f"Invalid value for '{param}': {first['msg']}." + (f" ({more} more problem(s))" if more else ""),
            param=param,
            code="invalid_value",
        ) from None
