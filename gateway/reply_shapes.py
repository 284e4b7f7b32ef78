"""A completion reply's two shapes, each made of the other (pure: no I/O).

``assemble`` folds a stream's chunks into the JSON reply they stand for, as the openai SDK
accumulates them (content, refusal, tool calls and logprobs per choice). ``sse_events`` cuts a
JSON reply into stream chunks: the text in pieces of at most ``PIECE_WORDS`` words and
``PIECE_CHARS`` characters (``split_text``), a tool call's name first and its arguments after.
Both serve chat completions and text completions alike.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

#: a JSON reply cut into a stream: a piece holds at most this many words and characters, an
#: approximation of "at most 16 tokens" (a word is ~1.3 tokens, a token ~4 characters of English)
PIECE_WORDS = 12
PIECE_CHARS = 48

_WORD = re.compile(r"\s*\S+|\s+")


def assemble(endpoint: str, chunks: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
    """Stream chunks folded into the JSON reply they stand for (as the openai SDK accumulates them)."""
    head: dict[str, Any] = {}
    states: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for field in ("id", "created", "model", "system_fingerprint"):
            if field not in head and chunk.get(field) is not None:
                head[field] = chunk[field]
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            st = states.setdefault(
                int(choice.get("index") or 0),
                {"text": [], "refusal": [], "tools": {}, "finish": None, "logprobs": None},
            )
            if choice.get("finish_reason") is not None:
                st["finish"] = choice["finish_reason"]
            if isinstance(logprobs := choice.get("logprobs"), dict):
                _merge_logprobs(st, logprobs)
            delta = choice.get("delta") if endpoint == "chat" else {"content": choice.get("text")}
            if delta is None:
                continue
            if not isinstance(delta, dict):
                raise TypeError("a delta that is not an object")
            if isinstance(delta.get("content"), str):
                st["text"].append(delta["content"])
            if isinstance(delta.get("refusal"), str):
                st["refusal"].append(delta["refusal"])
            for call in delta.get("tool_calls") or ():
                slot = st["tools"].setdefault(
                    int(call.get("index") or 0), {"id": None, "type": "function", "name": [], "arguments": []}
                )
                if call.get("id"):
                    slot["id"] = call["id"]
                function = call.get("function") or {}
                if isinstance(function.get("name"), str):
                    slot["name"].append(function["name"])
                if isinstance(function.get("arguments"), str):
                    slot["arguments"].append(function["arguments"])
    chat = endpoint == "chat"
    reply: dict[str, Any] = {
        "id": head.get("id", ""),
        "object": "chat.completion" if chat else "text_completion",
        "created": head.get("created", 0),
        "model": head.get("model", ""),
    }
    if "system_fingerprint" in head:
        reply["system_fingerprint"] = head["system_fingerprint"]
    reply["choices"] = [_choice(chat, i, states[i]) for i in sorted(states)]
    if usage is not None:
        reply["usage"] = usage
    return reply


def _merge_logprobs(st: dict[str, Any], logprobs: dict[str, Any]) -> None:
    if st["logprobs"] is None:
        st["logprobs"] = {k: list(v) if isinstance(v, list) else v for k, v in logprobs.items()}
        return
    for k, v in logprobs.items():
        if isinstance(v, list) and isinstance(st["logprobs"].get(k), list):
            st["logprobs"][k].extend(v)


def _choice(chat: bool, index: int, st: dict[str, Any]) -> dict[str, Any]:
    text = "".join(st["text"])
    if not chat:
        return {"index": index, "text": text, "logprobs": st["logprobs"], "finish_reason": st["finish"]}
    tools = [
        {
            "id": t["id"] or f"call_{index}_{j}",
            "type": t["type"],
            "function": {"name": "".join(t["name"]), "arguments": "".join(t["arguments"])},
        }
        for j, t in sorted(st["tools"].items())
    ]
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not tools else None}
    if st["refusal"]:
        message["refusal"] = "".join(st["refusal"])
    if tools:
        message["tool_calls"] = tools
    return {"index": index, "message": message, "logprobs": st["logprobs"], "finish_reason": st["finish"]}


def split_text(text: str, max_words: int = PIECE_WORDS, max_chars: int = PIECE_CHARS) -> list[str]:
    """``text`` in pieces of at most ``max_words`` words and ``max_chars`` characters; joined, the same."""
    pieces: list[str] = []
    current: list[str] = []
    words = length = 0
    for match in _WORD.finditer(text):
        word = match.group()
        if current and (words >= max_words or length + len(word) > max_chars):
            pieces.append("".join(current))
            current, words, length = [], 0, 0
        while len(word) > max_chars:
            pieces.append(word[:max_chars])
            word = word[max_chars:]
        if word:
            current.append(word)
            words, length = words + 1, length + len(word)
    if current:
        pieces.append("".join(current))
    return pieces


def event(chunk: dict[str, Any]) -> bytes:
    """One SSE event: ``data:``, the chunk's JSON on one line, and the blank line that ends it."""
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def sse_events(endpoint: str, reply: dict[str, Any], include_usage: bool) -> list[bytes]:
    """A JSON reply as the stream chunks that would have made it, ``[DONE]`` not included; its
    ``usage`` as a last usage-only chunk when ``include_usage``."""
    chat = endpoint == "chat"
    head = {
        "id": reply.get("id", ""),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": reply.get("created", 0),
        "model": reply.get("model", ""),
    }
    if chat and reply.get("system_fingerprint") is not None:
        head["system_fingerprint"] = reply["system_fingerprint"]
    out: list[bytes] = []
    for choice in reply.get("choices") or ():
        index = choice.get("index", 0)

        def emit(
            delta: dict[str, Any], finish: str | None = None, logprobs: Any = None, index: int = index
        ) -> None:
            if chat:
                body = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            else:
                body = {
                    "index": index,
                    "text": delta.get("content", ""),
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }
            out.append(event({**head, "choices": [body]}))

        message = (choice.get("message") or {}) if chat else {"content": choice.get("text")}
        if chat:
            emit({"role": "assistant", "content": ""})
        for piece in split_text(message.get("content") or ""):
            emit({"content": piece})
        for piece in split_text(message.get("refusal") or ""):
            emit({"refusal": piece})
        for j, call in enumerate(message.get("tool_calls") or ()):
            function = call.get("function") or {}
            emit(
                {
                    "tool_calls": [
                        {
                            "index": j,
                            "id": call.get("id"),
                            "type": call.get("type", "function"),
                            "function": {"name": function.get("name", ""), "arguments": ""},
                        }
                    ]
                }
            )
            for piece in split_text(function.get("arguments") or "", max_words=PIECE_CHARS):
                emit({"tool_calls": [{"index": j, "function": {"arguments": piece}}]})
        emit({}, choice.get("finish_reason"), choice.get("logprobs"))
    if include_usage and isinstance(reply.get("usage"), dict):
        out.append(event({**head, "choices": [], "usage": reply["usage"]}))
    return out
