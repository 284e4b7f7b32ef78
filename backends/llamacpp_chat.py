"""Prompt rendering and OpenAI request and reply shapes for the in-process llama.cpp backend.

Replies follow the OpenAI wire format byte for byte in structure (the fields the
official SDK reads), with vLLM's SSE framing: ``data: {json}\\n\\n`` per chunk and
``data: [DONE]\\n\\n`` at the end. A streamed chunk is a prebuilt prefix, the
JSON-escaped text, and a prebuilt suffix, so a token costs one ``orjson.dumps`` of
a short string.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from base64 import b64encode
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson

from backends.errors import InvalidRequest

DONE = b"data: [DONE]\n\n"

T = TypeVar("T")


def make_chat_renderer(template: str, bos_token: str, eos_token: str) -> Callable[[list[Any]], str]:
    """A function from OpenAI ``messages`` to the prompt text, generation prompt appended.

    It uses llama-cpp-python's sandboxed Jinja2 formatter, the one its own
    ``create_chat_completion`` uses, so the prompt matches what ``Llama`` renders.
    Imported here, not at module top: loading llama_cpp is the engine's business.
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=template, bos_token=bos_token, eos_token=eos_token)

    def render(messages: list[Any]) -> str:
        try:
            return formatter(messages=[_plain_message(m) for m in messages]).prompt
        except InvalidRequest:
            raise
        except Exception as exc:  # templates raise_exception() on role orders they refuse
            raise InvalidRequest(f"the chat template rejected these messages: {exc}",
                                 param="messages") from exc

    return render


def _plain_message(message: Any) -> dict[str, Any]:
    """Flatten content parts to a string: chat templates of small models expect text only."""
    if not isinstance(message, dict):
        raise InvalidRequest("each message must be an object", param="messages")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidRequest(f"content parts of type {kind!r} are not supported by the "
                                     "llamacpp backend (text only)", param="messages")
            texts.append(str(part.get("text", "")))
        content = "".join(texts)
    elif content is None:
        content = ""
    role = message.get("role")
    # OpenAI's newer "developer" role means what templates call "system".
    return {"role": "system" if role == "developer" else role, "content": content}


class Shaper:
    """Builds the OpenAI bodies and SSE chunks of one request."""

    def __init__(self, endpoint: str, model: str, *, include_usage: bool = False) -> None:
        self.chat = endpoint == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        self._head = (f'data: {{"id":"{self.id}","object":"{obj}","created":{self.created},'
                      f'"model":').encode() + orjson.dumps(model) + b',"choices":'
        key = b'"delta":{"content":' if self.chat else b'"text":'
        self._delta_prefix = self._head + b'[{"index":0,' + key
        close = b"}" if self.chat else b""
        self._delta_suffix = close + b',"logprobs":null,"finish_reason":null}]}\n\n'

    def first_chunk(self) -> bytes | None:
        """The role announcement that opens a chat stream; completions have none."""
        if not self.chat:
            return None
        return self._head + b'[{"index":0,"delta":{"role":"assistant","content":""},' \
                            b'"logprobs":null,"finish_reason":null}]}\n\n'

    def delta_chunk(self, text: str) -> bytes:
        return self._delta_prefix + orjson.dumps(text) + self._delta_suffix

    def final_chunks(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> list[bytes]:
        """The finish_reason chunk, the usage chunk when asked for, and ``[DONE]``."""
        empty = b'"delta":{}' if self.chat else b'"text":""'
        out = [self._head + b'[{"index":0,' + empty + b',"logprobs":null,"finish_reason":'
               + orjson.dumps(finish_reason) + b"}]}\n\n"]
        if self.include_usage:
            usage = orjson.dumps(_usage(prompt_tokens, completion_tokens))
            out.append(self._head + b'[],"usage":' + usage + b"}\n\n")
        out.append(DONE)
        return out

    def body(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The non-streamed ``chat.completion`` / ``text_completion`` JSON."""
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return orjson.dumps({
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": _usage(prompt_tokens, completion_tokens),
        })


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


#: texts longer than this are tokenized in a worker thread (~3 ms of tokenizing on the event loop)
INLINE_TOKENIZE_CHARS = 16_384


async def tokenize_sized(chars: int, tokenize: Callable[[], T]) -> T:
    """``tokenize()`` for ``chars`` characters of text: on the event loop when that is quick, else
    in a worker thread (4 MB took SmolLM2's tokenizer ~0.7 s, every stream paused meanwhile)."""
    return await asyncio.to_thread(tokenize) if chars > INLINE_TOKENIZE_CHARS else tokenize()

#: OpenAI's limit on the inputs of one embeddings request
MAX_EMBEDDING_INPUTS = 2048


def embedding_inputs(value: Any, n_vocab: int) -> list[str | list[int]]:
    """The inputs of an embeddings request: texts, or token lists (ids of this model's vocabulary)."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list) and value and all(type(t) is int for t in value):
        items = [value]
    elif isinstance(value, list):
        items = value
    else:
        raise InvalidRequest("input must be a string, a list of strings or a list of token lists",
                             param="input")
    if not items:
        raise InvalidRequest("input must not be empty", param="input")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(f"input holds {len(items)} items; at most {MAX_EMBEDDING_INPUTS} "
                             "fit in one request", param="input")
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise InvalidRequest(f"input {i} is an empty string", param="input")
        elif not (isinstance(item, list) and item and all(type(t) is int for t in item)):
            raise InvalidRequest(f"input {i} is neither a string nor a list of token ids", param="input")
        elif not all(0 <= t < n_vocab for t in item):
            raise InvalidRequest(f"input {i} holds a token id outside this model's vocabulary "
                                 f"(0..{n_vocab - 1})", param="input")
    return items


def embeddings_body(vectors: Sequence[Any], model: str, n_tokens: int, *, base64: bool) -> bytes:
    """The ``/v1/embeddings`` reply: unit vectors (numpy rows) as float lists, or as base64 of
    their little-endian float32 bytes (what the ``openai`` SDK asks for by default)."""
    data = [{"object": "embedding", "index": i,
             "embedding": b64encode(v.astype("<f4").tobytes()).decode() if base64 else v.tolist()}
            for i, v in enumerate(vectors)]
    return orjson.dumps({"object": "list", "data": data, "model": model,
                         "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})
