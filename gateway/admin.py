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

from gateway.admin_query import parse_admin_query
from gateway.router import Router
from gateway.snapshot import Route
from gateway.state import Gateway
from policies.base import RequestFacts

#: the request the ranking is shown for, unless the query string says otherwise
_TYPICAL = RequestFacts(prompt_tokens=500, max_tokens=256)


def routes_report(gateway: Gateway, facts: RequestFacts = _TYPICAL) -> dict[str, object]:
    snapshot = gateway.snapshot
    return {
        "config": {"hash": snapshot.hash, "source": snapshot.config.source, "loaded_at": snapshot.loaded_at},
        "request": {
            "prompt_tokens": facts.prompt_tokens,
            "max_tokens": facts.max_tokens,
            "ttft_budget_ms": facts.ttft_budget_ms,
        },
        "retry_budget": gateway.router.budget.snapshot(),
        "routes": {
            name: _route_report(gateway.router, route, facts) for name, route in snapshot.routes.items()
        },
    }


def _route_report(router: Router, route: Route, facts: RequestFacts) -> dict[str, object]:
    return {
        "policy": route.policy,
        "attempts": route.attempts,
        "hedge": route.hedge,
        "ttft_slo_ms": route.ttft_slo_ms,
        "order": [
            {
                "backend": choice.target.name,
                "kind": choice.target.backend.kind,
                "reason": choice.reason,
                "breaker": choice.target.breaker.snapshot(),
                "healthy": choice.target.healthy,
                "health_reason": choice.target.health_reason,
                "load": dataclasses.asdict(choice.target.backend.load()),
                "max_in_flight": choice.target.max_in_flight,
                "price": choice.target.price.model_dump(),
                "stats": choice.target.stats.snapshot(),
                # what only this kind of backend knows (a pool's endpoints, say)
                **choice.target.backend.describe(),
            }
            for choice in router.plan(route, facts)
        ],
    }


def admin_routes(gateway: Gateway) -> Callable[[Request], Awaitable[Response]]:
    async def handle(request: Request) -> Response:
        # validated as inference bodies are: a bad value is a 400 naming it (the app renders it)
        facts = parse_admin_query(request.query_params)
        return Response(orjson.dumps(routes_report(gateway, facts)), media_type="application/json")

    return handle
