"""A request as a vLLM pool sends and routes it: the body vLLM gets, and the figures routing needs.

``shape`` refuses bodies vLLM mishandles before they are sent (``messages: []`` resets the
connection, a non-object body is a 500, a missing ``model`` is served by the default), though
the gateway refuses them first. ``plan_request`` adds what the pool routes on: the prompt's block keys
(``backends.vllm.affinity``), its estimated tokens and the reply it may cost, the session key
and the conversation's opening.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backends.base import ENDPOINT_PATHS, BackendRequest
from backends.errors import InvalidRequest
from backends.vllm.affinity import block_keys, prompt_tokens, render_prompt

#: the reply length assumed when a request sets no max_tokens (as the gateway's ranking does)
DEFAULT_MAX_TOKENS = 256
PROMPT_FIELD = {"chat": "messages", "completions": "prompt", "embeddings": "input"}


@dataclass(slots=True)
class Plan:
    """A request as the pool routes it."""

    path: str
    body: dict[str, Any]
    keys: list[int]
    tokens: int
    decode: int
    session: str | None
    conversation: str
    #: the body field holding the prompt: named when the prompt is too long
    prompt_field: str
    request_id: str = ""


def plan_request(request: BackendRequest, model: str | None, block_chars: int) -> Plan:
    """``request`` shaped for vLLM (``model``: the pool's, else the client's) and measured for routing."""
    body = shape(request, model)
    rendered = render_prompt(request.endpoint, body)
    if request.endpoint == "embeddings":
        keys, decode = [], 0
    else:
        keys = block_keys(rendered, block_chars)
        limit = _count(body.get("max_completion_tokens")) or _count(body.get("max_tokens"))
        decode = (limit or DEFAULT_MAX_TOKENS) * (_count(body.get("n")) or 1)
    if request.endpoint == "chat":
        messages = body["messages"]
        first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), 0)
        conversation = render_prompt("chat", {"messages": messages[: first_user + 1]})
    else:
        conversation = rendered[:block_chars]
    return Plan(
        path=ENDPOINT_PATHS[request.endpoint],
        body=body,
        keys=keys,
        tokens=prompt_tokens(request.endpoint, body, rendered),
        decode=decode,
        session=request.session,
        conversation=conversation,
        prompt_field=PROMPT_FIELD[request.endpoint],
        request_id=request.request_id,
    )


def shape(request: BackendRequest, model: str | None) -> dict[str, Any]:
    """The body vLLM gets, in shapes it handles: it resets the connection on ``messages: []``,
    answers a non-object body with 500 and serves a missing ``model`` with its default."""
    body = request.body
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    model = model or body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(
            "Missing required parameter: 'model'.", param="model", code="missing_required_parameter"
        )
    field = PROMPT_FIELD[request.endpoint]
    value = body.get(field)
    if request.endpoint == "chat":
        if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
            raise InvalidRequest(
                "'messages' must be a non-empty array of message objects.",
                param="messages",
                code="invalid_value",
            )
    elif value is None or value == []:
        raise InvalidRequest(
            f"Missing required parameter: '{field}'.", param=field, code="missing_required_parameter"
        )
    shaped = {**body, "model": model}
    if not request.stream and shaped.get("stream"):
        shaped["stream"] = False
        shaped.pop("stream_options", None)
    return shaped


def _count(value: object) -> int:
    """A positive integer field of the body, or 0 (the gateway validated it; this never raises)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
