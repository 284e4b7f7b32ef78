"""Cache keys: canonical over key order, whitespace and number spelling; apart on anything that
changes the answer; the tenant as a hash tag. Cache-Control parsing per RFC 9111."""

from __future__ import annotations

import copy
import json
import random
import re
from typing import Any

import orjson
import pytest

from gateway.cache_key import (
    CacheControl,
    cache_key,
    canonical_body,
    is_deterministic,
    lock_key,
    parse_cache_control,
    tenant_tag,
)

BODY: dict[str, Any] = {
    "model": "m",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three colors."},
    ],
    "temperature": 0,
    "top_p": 1.0,
    "max_tokens": 32,
    "seed": 7,
    "stop": ["\n\n"],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ],
    "tool_choice": "auto",
    "response_format": {"type": "text"},
    "logit_bias": {"50256": -100},
}


def _shuffled(value: Any, rng: random.Random) -> Any:
    if isinstance(value, dict):
        items = [(k, _shuffled(v, rng)) for k, v in value.items()]
        rng.shuffle(items)
        return dict(items)
    if isinstance(value, list):
        return [_shuffled(v, rng) for v in value]
    return value


def _spelled(value: Any, rng: random.Random) -> str:
    """JSON text of ``value`` with random whitespace and random spellings of each number."""
    ws = lambda: rng.choice(["", " ", "\n", "\t", "  \r\n "])  # noqa: E731
    if isinstance(value, dict):
        inner = ",".join(
            f"{ws()}{json.dumps(k)}{ws()}:{ws()}{_spelled(v, rng)}{ws()}" for k, v in value.items()
        )
        return "{" + inner + ws() + "}"
    if isinstance(value, list):
        return "[" + ",".join(ws() + _spelled(v, rng) + ws() for v in value) + "]"
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return json.dumps(value)
    if float(value).is_integer():
        n = int(value)
        return rng.choice([str(n), f"{n}.0", f"{n}e0", f"{n}.000", f"{n}E+0"])
    return rng.choice([repr(value), f"{value}0", f"{value * 10}e-1"])


def test_permutations_of_order_whitespace_and_numbers_give_one_key() -> None:
    rng = random.Random(16)
    want = cache_key("chat", "alice", "m", BODY)
    keys = set()
    for _ in range(1000):
        text = _spelled(_shuffled(BODY, rng), rng)
        keys.add(cache_key("chat", "alice", "m", json.loads(text)))
    assert keys == {want}


def test_numbers_one_spelling() -> None:
    assert canonical_body({"a": 1}) == canonical_body({"a": 1.0}) == canonical_body({"a": 1e0})
    assert canonical_body({"a": 0.5}) == canonical_body({"a": 5e-1})
    # a boolean is not the number 1, and nested numbers are normalised too
    assert canonical_body({"a": True}) != canonical_body({"a": 1})
    assert canonical_body({"a": [{"b": 2.0}]}) == b'{"a":[{"b":2}]}'


CHANGES: list[tuple[str, Any]] = [
    ("temperature", 0.2),
    ("top_p", 0.9),
    ("max_tokens", 33),
    ("seed", 8),
    ("stop", ["\n"]),
    ("presence_penalty", 0.1),
    ("frequency_penalty", 0.1),
    ("n", 2),
    ("logit_bias", {"50256": -99}),
    ("response_format", {"type": "json_object"}),
    ("tool_choice", "none"),
    ("logprobs", True),
]


@pytest.mark.parametrize(("field", "value"), CHANGES)
def test_any_sampling_field_changes_the_key(field: str, value: Any) -> None:
    changed = {**BODY, field: value}
    assert cache_key("chat", "alice", "m", changed) != cache_key("chat", "alice", "m", BODY)


def test_tools_system_prompt_tenant_route_and_endpoint_change_the_key() -> None:
    base = cache_key("chat", "alice", "m", BODY)
    tool = copy.deepcopy(BODY)
    tool["tools"][0]["function"]["parameters"]["properties"]["city"]["type"] = "number"
    system = copy.deepcopy(BODY)
    system["messages"][0]["content"] = "You are verbose."
    no_tools = {k: v for k, v in BODY.items() if k != "tools"}
    others = {
        cache_key("chat", "alice", "m", tool),
        cache_key("chat", "alice", "m", system),
        cache_key("chat", "alice", "m", no_tools),
        cache_key("chat", "bob", "m", BODY),
        cache_key("chat", "alice", "m2", BODY),
        cache_key("completions", "alice", "m", BODY),
    }
    assert base not in others and len(others) == 6


def test_transport_and_accounting_fields_do_not_change_the_key() -> None:
    base = cache_key("chat", "alice", "m", BODY)
    for extra in (
        {"stream": True},
        {"stream": False},
        {"user": "u-123"},
        {"request_id": "r1"},
        {"stream": True, "stream_options": {"include_usage": True}},
    ):
        assert cache_key("chat", "alice", "m", {**BODY, **extra}) == base


def test_the_tenant_is_the_hash_tag() -> None:
    key = cache_key("chat", "alice", "m", BODY)
    match = re.fullmatch(r"interlock:v1:\{([0-9a-f]{16})\}:([0-9a-f]{64})", key)
    assert match and match.group(1) == tenant_tag("alice")
    # the lock shares the tag (one Cluster slot) and differs from the entry
    lock = lock_key(key)
    assert lock != key and "{" + tenant_tag("alice") + "}" in lock
    # a tenant name that looks like framing cannot shift another tenant's parts
    assert cache_key("chat", "a:b", "m", BODY) != cache_key("chat", "a", "b:m", BODY)


@pytest.mark.parametrize(
    ("body", "want"),
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0}, True),
        ({"seed": 1}, True),
        ({"temperature": 1, "seed": 0}, True),
        ({}, False),
        ({"temperature": 0.7}, False),
        ({"temperature": None}, False),
        ({"temperature": False}, False),
        ({"seed": None}, False),
    ],
)
def test_is_deterministic(body: dict[str, Any], want: bool) -> None:
    assert is_deterministic(body) is want


@pytest.mark.parametrize(
    ("header", "want"),
    [
        (None, CacheControl()),
        ("", CacheControl()),
        ("no-cache", CacheControl(no_cache=True)),
        ("No-Store", CacheControl(no_store=True)),
        ("max-age=60", CacheControl(max_age=60.0)),
        ('max-age="30"', CacheControl(max_age=30.0)),
        ("max-age=60, max-age=10", CacheControl(max_age=10.0)),
        ("only-if-cached, max-age=0", CacheControl(only_if_cached=True, max_age=0.0)),
        (
            " no-cache ,no-store,  only-if-cached ",
            CacheControl(no_cache=True, no_store=True, only_if_cached=True),
        ),
        ("max-age=99999999999999999999", CacheControl(max_age=2147483648.0)),
        ("max-age=" + "9" * 5000, CacheControl(max_age=2147483648.0)),
        # junk is ignored, never an error
        ("max-age=-1, max-age=1.5, max-age=abc, max-age", CacheControl()),
        (',,;=, \x00garbage, no-cache="x', CacheControl()),
        ("private, no-transform, max-stale=5, no-cache", CacheControl(no_cache=True)),
        ("max-age=٣", CacheControl()),  # a non-ASCII digit is not delta-seconds
    ],
)
def test_parse_cache_control(header: str | None, want: CacheControl) -> None:
    assert parse_cache_control(header) == want


def test_canonical_body_is_compact_sorted_json() -> None:
    assert canonical_body({"b": 1, "a": {"d": 1, "c": 2}, "stream": True}) == b'{"a":{"c":2,"d":1},"b":1}'
    assert orjson.loads(canonical_body(BODY))["temperature"] == 0
