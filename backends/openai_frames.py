"""OpenAI reply framing for the backends that write replies themselves.

The in-process llama.cpp backend and the Ollama backend (which translates Ollama's native
replies) both produce OpenAI bodies and SSE streams of their own; ``ReplyFrames`` is the one
place those shapes are written. Replies follow the OpenAI wire format in structure (the fields
the official SDK reads), with vLLM's SSE framing: ``data: {json}\\n\\n`` per chunk and
``data: [DONE]\\n\\n`` at the end. A text delta is a prebuilt prefix, the JSON-escaped text and
a prebuilt suffix, so a token costs one ``orjson.dumps`` of a short string.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from backends.base import Usage

DONE = b"data: [DONE]\n\n"


def usage_dict(usage: Usage) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


class ReplyFrames:
    """The id, SSE chunks and JSON body of one reply (a chat or a text completion)."""

    def __init__(self, chat: bool, model: str, *, include_usage: bool = False) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self._head = (
            (f'data: {{"id":"{self.id}","object":"{chunk_object}","created":{self.created},"model":').encode()
            + orjson.dumps(model)
            + b',"choices":'
        )
        key = b'"delta":{"content":' if chat else b'"text":'
        self._delta_prefix = self._head + b'[{"index":0,' + key
        self._delta_suffix = (b"}" if chat else b"") + b',"logprobs":null,"finish_reason":null}]}\n\n'

    def chunk(self, choice: dict[str, Any]) -> bytes:
        """A chunk of one choice; ``choice`` holds its ``delta`` (or ``text``) and maybe a
        ``finish_reason``."""
        return self._head + orjson.dumps([_choice(choice)]) + b"}\n\n"

    def role_chunk(self) -> bytes | None:
        """The role announcement that opens a chat stream; completions have none."""
        return self.chunk({"delta": {"role": "assistant", "content": ""}}) if self.chat else None

    def delta_chunk(self, text: str) -> bytes:
        return self._delta_prefix + orjson.dumps(text) + self._delta_suffix

    def final_chunks(self, finish_reason: str, usage: Usage) -> list[bytes]:
        """The finish_reason chunk, the usage chunk when the client asked for it, and ``[DONE]``."""
        empty: dict[str, Any] = {"delta": {}} if self.chat else {"text": ""}
        out = [self.chunk({**empty, "finish_reason": finish_reason})]
        if self.include_usage:
            out.append(self._head + b'[],"usage":' + orjson.dumps(usage_dict(usage)) + b"}\n\n")
        out.append(DONE)
        return out

    def body(self, choice: dict[str, Any], usage: Usage) -> bytes:
        """The non-streamed ``chat.completion`` / ``text_completion`` JSON of one choice:
        ``message`` (or ``text``) and ``finish_reason``."""
        return orjson.dumps(
            {
                "id": self.id,
                "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [_choice(choice)],
                "usage": usage_dict(usage),
            }
        )

    def text_body(self, text: str, finish_reason: str, usage: Usage) -> bytes:
        """``body`` for a reply that is only text."""
        if self.chat:
            choice: dict[str, Any] = {"message": {"role": "assistant", "content": text, "refusal": None}}
        else:
            choice = {"text": text}
        return self.body({**choice, "finish_reason": finish_reason}, usage)


def _choice(fields: dict[str, Any]) -> dict[str, Any]:
    """One choice in OpenAI's key order: index, content, logprobs, finish_reason."""
    out: dict[str, Any] = {"index": 0}
    out.update((k, v) for k, v in fields.items() if k != "finish_reason")
    out["logprobs"] = None
    out["finish_reason"] = fields.get("finish_reason")
    return out


__all__ = ["DONE", "ReplyFrames", "usage_dict"]
