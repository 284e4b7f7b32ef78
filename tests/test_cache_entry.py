"""Cache entries: only good answers are recorded, whatever the chunking; replays parse in the
openai SDK, JSON and SSE, whichever way the entry was recorded."""

from __future__ import annotations

import random
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.cache_entry import DONE, CachedReply, StreamRecorder, reply_from_json
from gateway.reply_shapes import split_text

HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m"}
USAGE = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}


def ev(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0, **extra: Any) -> bytes:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return ev({**HEAD, "choices": [choice], **extra})


def chat_stream(finish: str = "stop", usage: bool = True, done: bool = True) -> list[bytes]:
    events = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Red, "}),
        chunk({"content": "green, "}),
        chunk({"content": "blue."}),
        chunk({}, finish),
    ]
    if usage:
        events.append(ev({**HEAD, "choices": [], "usage": USAGE}))
    return events + ([DONE] if done else [])


def tool_stream(arguments: list[str]) -> list[bytes]:
    first = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    return [
        chunk({"role": "assistant", "content": None, "tool_calls": [first]}),
        *[chunk({"tool_calls": [{"index": 0, "function": {"arguments": a}}]}) for a in arguments],
        chunk({}, "tool_calls"),
        DONE,
    ]


def record(
    events: list[bytes],
    endpoint: str = "chat",
    splits: int = 0,
    seed: int = 0,
    max_bytes: int = 1 << 20,
    skips: list[str] | None = None,
) -> CachedReply | None:
    raw = b"".join(events)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(raw)), min(splits, len(raw) - 1)))
    recorder = StreamRecorder(endpoint, max_bytes, on_skip=None if skips is None else skips.append)
    for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True):
        recorder.feed(raw[a:b])
    return recorder.result(now=1700000000.0)


def test_arbitrary_splits_record_one_entry() -> None:
    want = record(chat_stream())
    assert want is not None and want.events is not None and len(want.events) == 5
    assert want.usage_chunk is not None and want.model == "m"
    for seed in range(200):
        assert record(chat_stream(), splits=seed % 40 + 1, seed=seed) == want
    # one byte at a time, and CRLF / CR line endings, comments and event fields are SSE too
    assert record(chat_stream(), splits=10_000) == want
    crlf = [e.replace(b"\n", b"\r\n") for e in chat_stream()]
    assert record(crlf, splits=300, seed=1) == want
    cr = [b": keep-alive\r\r", *(b"event: message\r" + e.replace(b"\n", b"\r") for e in chat_stream())]
    assert record(cr, splits=300, seed=2) == want


@pytest.mark.parametrize(
    ("events", "reason"),
    [
        ([ev({**HEAD, "choices": []}), DONE], "no_choices"),
        ([DONE], "no_choices"),
        (chat_stream(finish="length"), "finish"),
        (chat_stream(finish="content_filter"), "finish"),
        ([chunk({"content": "hi"}), DONE], "finish"),  # no finish_reason at all
        (chat_stream(done=False), "cut"),
        (chat_stream()[:3], "cut"),
        ([*chat_stream()[:3], ev({"error": {"message": "died", "type": "server_error"}}), DONE], "error"),
        ([*chat_stream()[:3], b"event: error\ndata: {}\n\n", *chat_stream()[3:]], "error"),
        ([*chat_stream()[:3], b"data: {not json\n\n", *chat_stream()[3:]], "garbage"),
        (tool_stream(['{"city": "Par', "is"]), "tool_args"),
        (tool_stream([]), "tool_args"),  # "" is not JSON
    ],
)
def test_bad_answers_record_nothing(events: list[bytes], reason: str) -> None:
    skips: list[str] = []
    assert record(events, splits=7, skips=skips) is None
    assert skips == [reason]


def test_oversize_records_nothing_and_says_so() -> None:
    skips: list[str] = []
    size = len(b"".join(chat_stream()))
    assert record(chat_stream(), max_bytes=size - 1, skips=skips) is None
    assert skips == ["oversize"]
    assert record(chat_stream(), max_bytes=size) is not None
    body = ChatCompletion.model_validate_json(record(chat_stream()).as_json()).model_dump_json().encode()
    assert reply_from_json("chat", body, max_bytes=len(body) - 1, on_skip=skips.append) is None
    assert skips == ["oversize", "oversize"]


def test_json_answers_are_checked_too() -> None:
    good = {
        "id": "x",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "usage": USAGE,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    }
    assert reply_from_json("chat", orjson.dumps(good)) is not None
    for bad, reason in [
        ({**good, "choices": []}, "no_choices"),
        ({**good, "choices": [{**good["choices"][0], "finish_reason": "length"}]}, "finish"),
        ({"error": {"message": "x"}}, "error"),
        (
            {
                **good,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "tool_calls",
                        "message": {
                            "role": "assistant",
                            "tool_calls": [
                                {
                                    "id": "c",
                                    "type": "function",
                                    "function": {"name": "f", "arguments": "{oops"},
                                }
                            ],
                        },
                    }
                ],
            },
            "tool_args",
        ),
    ]:
        skips: list[str] = []
        assert reply_from_json("chat", orjson.dumps(bad), on_skip=skips.append) is None
        assert skips == [reason]
    assert reply_from_json("chat", b"\xff not json") is None


def test_stream_entry_replays_its_own_boundaries_and_usage_on_request() -> None:
    entry = record(chat_stream())
    assert entry is not None
    without = entry.as_sse(include_usage=False)
    assert without == [*chat_stream(usage=False)]
    with_usage = entry.as_sse(include_usage=True)
    assert with_usage[:5] == chat_stream()[:5] and with_usage[-1] == DONE
    usage = ChatCompletionChunk.model_validate_json(with_usage[5][6:]).usage
    assert usage and usage.prompt_tokens == 11 and usage.prompt_tokens_details
    assert usage.prompt_tokens_details.cached_tokens == 11
    # as JSON: the deltas assembled, the usage reported as cached
    reply = ChatCompletion.model_validate_json(entry.as_json())
    assert reply.choices[0].message.content == "Red, green, blue."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage and reply.usage.prompt_tokens_details
    assert reply.usage.prompt_tokens_details.cached_tokens == 11


def test_tool_calls_assemble() -> None:
    entry = record(tool_stream(['{"city":', ' "Paris"}']), splits=9)
    assert entry is not None
    reply = ChatCompletion.model_validate_json(entry.as_json())
    call = reply.choices[0].message.tool_calls[0]
    assert call.id == "call_1" and call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {"city": "Paris"}
    assert reply.choices[0].message.content is None and reply.usage is None


LONG = " ".join(f"word{i}" for i in range(100)) + "  and a Supercalifragilisticexpialidocious" * 3


def _json_reply(content: str, n: int = 1) -> bytes:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": f"{i}:{content}"},
            "logprobs": None,
            "finish_reason": "stop",
        }
        for i in range(n)
    ]
    return orjson.dumps(
        {
            "id": "chatcmpl-9",
            "object": "chat.completion",
            "created": 5,
            "model": "m",
            "system_fingerprint": "fp",
            "choices": choices,
            "usage": USAGE,
        }
    )


def test_json_entry_replays_as_a_stream_of_small_chunks() -> None:
    entry = reply_from_json("chat", _json_reply(LONG, n=2), now=10.0)
    assert entry is not None and entry.created == 10.0
    events = entry.as_sse(include_usage=False)
    assert events[-1] == DONE
    chunks = [ChatCompletionChunk.model_validate_json(e[6:]) for e in events[:-1]]
    assert all(c.usage is None for c in chunks)
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "stop"
        pieces = [c.delta.content for c in mine[1:-1]]
        assert "".join(pieces) == f"{i}:{LONG}"
        assert all(len(p.split()) <= 16 and len(p) <= 64 for p in pieces)  # ~16 tokens at most
    assert ChatCompletionChunk.model_validate_json(entry.as_sse(True)[-2][6:]).usage.prompt_tokens == 11
    # and back: a stream re-recorded from the replay is the same reply
    again = record(entry.as_sse(include_usage=True), splits=50)
    assert again is not None
    assert orjson.loads(again.as_json()) == orjson.loads(entry.as_json())


def test_split_text_joins_back() -> None:
    for text in ["", " ", "a", LONG, "x" * 500, "a\n\nb  c\t", "é" * 100 + " ü"]:
        pieces = split_text(text)
        assert "".join(pieces) == text and all(pieces)


def test_encode_decode_round_trip_and_garbage() -> None:
    entries = (record(chat_stream()), record(tool_stream(["{}"])), reply_from_json("chat", _json_reply("hi")))
    for entry in entries:
        assert entry is not None
        assert CachedReply.decode(entry.encode()) == entry
    for junk in (
        b"",
        b"\x00\xff",
        b"[]",
        b'{"f": 1}',
        b'{"f": 99, "endpoint": "chat"}',
        b"null",
        orjson.dumps(
            {
                "f": 1,
                "endpoint": "chat",
                "model": "m",
                "created": 1,
                "events": None,
                "usage_chunk": None,
                "body": None,
            }
        ),
    ):
        assert CachedReply.decode(junk) is None


def test_completions_both_ways() -> None:
    head = {"id": "cmpl-1", "object": "text_completion", "created": 3, "model": "m"}
    events = [
        ev({**head, "choices": [{"index": 0, "text": t, "logprobs": None, "finish_reason": None}]})
        for t in ("Once ", "upon ", "a time")
    ]
    events += [
        ev({**head, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]}),
        ev({**head, "choices": [], "usage": USAGE}),
        DONE,
    ]
    entry = record(events, endpoint="completions", splits=13)
    assert entry is not None
    reply = Completion.model_validate_json(entry.as_json())
    assert reply.choices[0].text == "Once upon a time"
    assert reply.usage.prompt_tokens_details.cached_tokens == 11
    from_json = reply_from_json("completions", entry.as_json())
    assert from_json is not None
    replay = from_json.as_sse(include_usage=True)
    again = record(replay, endpoint="completions")
    assert again is not None
    assert Completion.model_validate_json(again.as_json()).choices[0].text == "Once upon a time"


# --- through the SDK's own HTTP and SSE parsing ------------------------------------------------------


def _client(payload: bytes, stream: bool) -> openai.AsyncOpenAI:
    def handler(request: httpx.Request) -> httpx.Response:
        kind = "text/event-stream" if stream else "application/json"
        return httpx.Response(200, content=payload, headers={"content-type": kind})

    return openai.AsyncOpenAI(
        base_url="http://cache.test/v1",
        api_key="k",
        max_retries=0,
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )


@pytest.mark.parametrize("recorded", ["stream", "json"])
async def test_the_sdk_accepts_both_replays(recorded: str) -> None:
    entry = record(chat_stream()) if recorded == "stream" else reply_from_json("chat", _json_reply(LONG))
    assert entry is not None
    want = ChatCompletion.model_validate_json(entry.as_json()).choices[0].message.content
    args = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

    reply = await _client(entry.as_json(), stream=False).chat.completions.create(**args)
    assert reply.choices[0].message.content == want
    assert reply.usage is not None and reply.usage.prompt_tokens_details.cached_tokens == 11

    for include_usage in (False, True):
        client = _client(b"".join(entry.as_sse(include_usage)), stream=True)
        text, usage = [], None
        async for c in await client.chat.completions.create(**args, stream=True):
            text += [ch.delta.content or "" for ch in c.choices]
            usage = c.usage or usage
        assert "".join(text) == want
        assert (usage is not None) is include_usage


async def test_the_sdk_raises_on_a_stream_with_an_error_event() -> None:
    # the negative control: what the recorder refuses is what the SDK itself treats as a failure
    bad = b"".join([*chat_stream()[:3], ev({"error": {"message": "boom", "type": "server_error"}}), DONE])
    with pytest.raises(openai.APIError):
        async for _ in await _client(bad, stream=True).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            pass


def test_wrong_shapes_are_garbage_not_errors() -> None:
    for events in (
        [ev({**HEAD, "choices": [{"index": "x", "delta": {}, "finish_reason": "stop"}]}), DONE],
        [ev({**HEAD, "choices": [{"index": 0, "delta": [], "finish_reason": "stop"}]}), DONE],
        [ev([1, 2]), DONE],
        [b"data: 3\n\n", DONE],
    ):
        skips: list[str] = []
        assert record(events, skips=skips) is None and len(skips) == 1
    assert reply_from_json("chat", b'{"choices": [{"finish_reason": "stop", "message": "x"}]}') is None


def test_json_spread_over_data_lines_replays_as_one_line() -> None:
    spread = [e.replace(b'{"index"', b'\ndata: {"index"') for e in chat_stream()]
    assert spread != chat_stream()
    entry = record(spread, splits=20)
    assert entry is not None and entry.as_json() == record(chat_stream()).as_json()
    assert all(e.count(b"\n") == 2 for e in entry.as_sse(include_usage=True))
