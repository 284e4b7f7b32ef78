"""A request's sampling options for the in-process llama.cpp backend: what it honours becomes a
``Sampling``, and an option that would change the reply but cannot be honoured is a 400."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from backends.errors import InvalidRequest

if TYPE_CHECKING:
    from backends.llamacpp.sampling import Sampling

#: (field, is_a_request_we_cannot_honour, what) for options that change the reply
UNSUPPORTED: list[tuple[str, Callable[[Any], bool], str]] = [
    ("logprobs", lambda v: v is not False, "logprobs"),
    ("top_logprobs", lambda v: v != 0, "top_logprobs"),
    ("tools", lambda v: bool(v), "tool calling"),
    ("functions", lambda v: bool(v), "function calling"),
    ("logit_bias", lambda v: bool(v), "logit_bias"),
    ("echo", lambda v: bool(v), "echo"),
    ("suffix", lambda v: bool(v), "suffix"),
    ("best_of", lambda v: v != 1, "best_of>1"),
    (
        "response_format",
        lambda v: not (isinstance(v, dict) and v.get("type") == "text"),
        "response_format other than text",
    ),
]


def sampling_of(body: dict[str, Any], endpoint: str) -> Sampling:
    """The ``Sampling`` of a request body; raises ``InvalidRequest`` naming the field."""
    # Imported here: backends.llamacpp.sampling imports numpy, which must load after llama_cpp.
    from backends.llamacpp.sampling import Sampling

    for key, bad, why in UNSUPPORTED:
        value = body.get(key)
        if value is not None and bad(value):
            raise InvalidRequest(f"{why} is not supported by the llamacpp backend", param=key)
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidRequest("n>1 is not supported by the llamacpp backend", param="n")
    max_tokens = body.get("max_completion_tokens") if endpoint == "chat" else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        raise InvalidRequest("max_tokens must be a positive integer", param="max_tokens")
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) for s in stops):
        raise InvalidRequest("stop must be a string or a list of strings", param="stop")
    seed = body.get("seed")
    return Sampling(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=seed if type(seed) is int else None,
        max_tokens=max_tokens,
        stop=tuple(s for s in stops if s),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
    )


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if type(value) not in (int, float) or not low <= value <= high:
        raise InvalidRequest(f"{key} must be a number between {low:g} and {high:g}", param=key)
    return float(value)


__all__ = ["UNSUPPORTED", "sampling_of"]
