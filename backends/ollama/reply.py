"""Ollama's replies → OpenAI's shapes: ``chat.completion`` / ``text_completion`` bodies, SSE
chunks, embeddings lists (pure: no I/O; the request side is ``backends.ollama.request``).

Written from Ollama's API reference (https://github.com/ollama/ollama/blob/main/docs/api.md;
§ as there):
    * chat (§1): ``message.content`` deltas → content deltas, ``message.thinking`` →
      ``reasoning_content`` (vLLM's field name), whole tool calls → one ``tool_calls`` delta each
      (arguments re-encoded as JSON strings, ``finish_reason: "tool_calls"``).
    * stream chunks (§1): each NDJSON object becomes the SSE chunks it makes; the final
      ``done: true`` object gives ``finish_reason`` (``done_reason``: ``length`` → ``length``;
      ``stop``, ``load``, ``unload`` → ``stop``) and usage (``prompt_eval_count`` / ``eval_count``;
      zero values are omitted by Ollama and read as 0).
    * embeddings (§3): ``encoding_format: "base64"`` (the openai SDK's default) is encoded here
      (little-endian float32).

Usage caveat: Ollama's ``prompt_eval_count`` counts the prompt tokens it evaluated, which can be
fewer than the prompt when its prompt cache was reused.
"""

from __future__ import annotations

import base64
import struct
import uuid
from typing import Any

import orjson

from backends.base import BackendRequest, BackendResponse, Usage
from backends.errors import BackendUnavailable
from backends.openai_frames import ReplyFrames


def client_model(request: BackendRequest) -> str:
    """The model the client asked for, which the reply names (not the Ollama model's name)."""
    model = request.body.get("model")
    return model if isinstance(model, str) else ""


def int_or_zero(value: Any) -> int:
    return value if type(value) is int else 0


def reply_usage(data: dict[str, Any]) -> Usage:
    return Usage(int_or_zero(data.get("prompt_eval_count")), int_or_zero(data.get("eval_count")))


def _finish_reason(done_reason: Any, tool_calls: bool) -> str:
    if done_reason == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


def _tool_call_out(call: Any, index: int | None) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    fn = fn if isinstance(fn, dict) else {}
    arguments = fn.get("arguments")
    out: dict[str, Any] = {} if index is None else {"index": index}
    call_id = call.get("id") if isinstance(call, dict) else None
    out["id"] = call_id if isinstance(call_id, str) and call_id else "call_" + uuid.uuid4().hex[:24]
    out["type"] = "function"
    out["function"] = {
        "name": str(fn.get("name") or ""),
        "arguments": arguments
        if isinstance(arguments, str)
        else orjson.dumps(arguments if arguments is not None else {}).decode(),
    }
    return out


class Shape:
    """Ollama's replies for one request, as OpenAI bodies and SSE chunks."""

    def __init__(self, chat: bool, model: str, *, include_usage: bool = False) -> None:
        self.chat = chat
        self.frames = ReplyFrames(chat, model, include_usage=include_usage)
        self._started = False
        self._tool_calls = 0

    def feed(self, data: dict[str, Any]) -> tuple[bytes, bool]:
        """One NDJSON object → the SSE bytes it makes (maybe none), and whether it was the last."""
        out = bytearray()
        if self.chat:
            if not self._started:
                self._started = True
                out += self.frames.chunk({"delta": {"role": "assistant", "content": ""}})
            message = data.get("message")
            message = message if isinstance(message, dict) else {}
            thinking = message.get("thinking")
            if isinstance(thinking, str) and thinking:
                out += self.frames.chunk({"delta": {"reasoning_content": thinking}})
            content = message.get("content")
            if isinstance(content, str) and content:
                out += self.frames.delta_chunk(content)
            calls = message.get("tool_calls")
            if isinstance(calls, list) and calls:
                deltas = []
                for call in calls:
                    deltas.append(_tool_call_out(call, self._tool_calls))
                    self._tool_calls += 1
                out += self.frames.chunk({"delta": {"tool_calls": deltas}})
        else:
            text = data.get("response")
            if isinstance(text, str) and text:
                out += self.frames.delta_chunk(text)
        done = data.get("done") is True
        if done:
            finish = _finish_reason(data.get("done_reason"), self._tool_calls > 0)
            out += b"".join(self.frames.final_chunks(finish, reply_usage(data)))
        return bytes(out), done

    def body(self, data: dict[str, Any]) -> bytes:
        """The non-streamed ``chat.completion`` / ``text_completion`` JSON from Ollama's one object."""
        finish: str
        if self.chat:
            message = data.get("message")
            message = message if isinstance(message, dict) else {}
            content = message.get("content") if isinstance(message.get("content"), str) else ""
            calls = message.get("tool_calls") if isinstance(message.get("tool_calls"), list) else []
            reply: dict[str, Any] = {
                "role": "assistant",
                "content": content or (None if calls else ""),
                "refusal": None,
            }
            thinking = message.get("thinking")
            if isinstance(thinking, str) and thinking:
                reply["reasoning_content"] = thinking
            if calls:
                reply["tool_calls"] = [_tool_call_out(c, None) for c in calls]
            finish = _finish_reason(data.get("done_reason"), bool(calls))
            choice: dict[str, Any] = {"message": reply, "finish_reason": finish}
        else:
            text = data.get("response") if isinstance(data.get("response"), str) else ""
            choice = {"text": text, "finish_reason": _finish_reason(data.get("done_reason"), False)}
        return self.frames.body(choice, reply_usage(data))


def embeddings_reply(data: dict[str, Any], model: str, encoding: Any) -> BackendResponse:
    vectors = data.get("embeddings")
    if not isinstance(vectors, list) or not all(isinstance(v, list) for v in vectors):
        raise BackendUnavailable("ollama's /api/embed reply has no embeddings list")
    items = []
    for index, vector in enumerate(vectors):
        value: Any = vector
        if encoding == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        items.append({"object": "embedding", "index": index, "embedding": value})
    prompt_tokens = int_or_zero(data.get("prompt_eval_count"))
    body = orjson.dumps(
        {
            "object": "list",
            "data": items,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )
    return BackendResponse(body=body, usage=Usage(prompt_tokens, 0))
