"""OpenAI request shapes, validated at the edge.

The models check the fields the OpenAI API defines, strictly typed (``"0.5"`` is
not a number), and allow everything else through: the validated object is only
a check, the client's own dict is what travels on, so fields added to the API
tomorrow reach backends that accept them without a release here.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from backends.base import Endpoint
from backends.errors import InvalidRequest

_STRICT = ConfigDict(strict=True, extra="allow")

Number = float


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool | None = None


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class _Sampling(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = _STRICT
    model: str = Field(min_length=1, max_length=256)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Number | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Number] | None = None
    user: str | None = None

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> Any:
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop sequences")
        return value


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)


class EmbeddingRequest(BaseModel):
    model_config = _STRICT
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if value == "" or value == []:
            raise ValueError("must not be empty")
        return value


REQUEST_MODELS: dict[Endpoint, type[BaseModel]] = {
    "chat": ChatCompletionRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingRequest,
}


#: deepest nesting of arrays and objects a body may have. orjson reads up to 1,024 levels but
#: writes only 254, and a body is written again on its way to a backend: a deeper one would fail
#: there, in the gateway's own code, after routing. No OpenAI request comes near this.
MAX_JSON_DEPTH = 128


def parse_body(endpoint: Endpoint, raw: bytes) -> dict[str, Any]:
    """Decode and validate a request body; returns the client's dict, or raises ``InvalidRequest``."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    # Nesting cannot pass the number of brackets, and counting bytes is nearly free: the walk
    # runs only for bodies with that many.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _too_deep(body, MAX_JSON_DEPTH):
        raise InvalidRequest(
            f"The request body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels.",
            code="invalid_json",
        )
    try:
        REQUEST_MODELS[endpoint].model_validate(body)
    except ValidationError as exc:
        raise _first_problem(exc) from None
    return body


def _too_deep(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _first_problem(exc: ValidationError) -> InvalidRequest:
    errors = exc.errors(include_url=False)
    # A union reports one error per branch; the first names the field well enough.
    first = errors[0]
    loc = [p for p in first["loc"] if not (isinstance(p, str) and p in _UNION_TAGS)]
    param = ""
    for part in loc:
        param = f"{param}[{part}]" if isinstance(part, int) else f"{param}.{part}" if param else str(part)
    msg = first["msg"]
    if first["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
    elif not param:
        message = msg.removeprefix("Value error, ")
    else:
        message = f"Invalid value for '{param}': {msg.removeprefix('Value error, ')}."
    if len(errors) > 1 and first["type"] != "missing" and not _is_union(errors):
        message += f" ({len(errors) - 1} more problem(s) in the body)"
    return InvalidRequest(
        message,
        param=param or None,
        code="missing_required_parameter" if first["type"] == "missing" else "invalid_value",
    )


def _is_union(errors: list[Any]) -> bool:
    return len({tuple(e["loc"][:1]) for e in errors}) == 1


# pydantic names union branches in ``loc``; they mean nothing to a client
_UNION_TAGS = {
    "str",
    "list[str]",
    "list[int]",
    "list[list[int]]",
    "list[dict[str,any]]",
    "dict[str,any]",
    "float",
    "int",
    "bool",
}
