"""``GET /admin/routes``: the live ranking per route and the figures behind it.

What an operator asks when traffic goes somewhere unexpected: for a typical request,
in which order would each route try its backends and why, and what do the breakers
and stats say. ``interlock routes`` prints the same as a table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.router import Router
from policies.base import RequestFacts

#: the request the ranking is shown for, unless the query string says otherwise
_TYPICAL = RequestFacts(prompt_tokens=500, max_tokens=256)


def routes_report(router: Router, facts: RequestFacts = _TYPICAL) -> dict[str, object]:
    routes = {}
    for name, route in router.routes.items():
        order = router.plan(route, facts)
        routes[name] = {
            "policy": route.policy,
            "attempts": route.attempts,
            "hedge": route.hedge,
            "ttft_slo_ms": route.ttft_slo_ms,
            "order": [
                {
                    "backend": choice.target.name,
                    "reason": choice.reason,
                    "breaker": choice.target.breaker.snapshot(),
                    "healthy": choice.target.healthy,
                    "health_reason": choice.target.health_reason,
                    "load": dataclasses.asdict(choice.target.backend.load()),
                    "max_in_flight": choice.target.max_in_flight,
                    "price": choice.target.price.model_dump(),
                    "stats": choice.target.stats.snapshot(),
                    # pools (kind: vllm) show each endpoint's figures too
                    **({"endpoints": choice.target.backend.endpoints()}  # type: ignore[attr-defined]
                       if hasattr(choice.target.backend, "endpoints") else {}),
                }
                for choice in order
            ],
        }
    return {
        "request": {"prompt_tokens": facts.prompt_tokens, "max_tokens": facts.max_tokens,
                    "ttft_budget_ms": facts.ttft_budget_ms},
        "retry_budget": router.budget.snapshot(),
        "routes": routes,
    }


def admin_routes(router: Router) -> Callable[[Request], Awaitable[Response]]:
    async def handle(request: Request) -> Response:
        query = request.query_params
        try:
            facts = RequestFacts(
                prompt_tokens=int(query.get("prompt_tokens", _TYPICAL.prompt_tokens)),
                max_tokens=int(query.get("max_tokens", _TYPICAL.max_tokens)),
                ttft_budget_ms=float(query["ttft_ms"]) if "ttft_ms" in query else None,
            )
        except ValueError:
            return Response(b'{"error":{"message":"prompt_tokens, max_tokens and ttft_ms must be numbers",'
                            b'"type":"invalid_request_error","param":null,"code":null}}', 400,
                            media_type="application/json")
        return Response(orjson.dumps(routes_report(router, facts)), media_type="application/json")

    return handle
