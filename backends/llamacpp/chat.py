"""Prompt rendering and OpenAI request shapes for the in-process llama.cpp backend; its replies
are framed by ``backends.openai_frames``."""

from __future__ import annotations

import asyncio
import re
import secrets
from base64 import b64encode
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson

from backends.errors import InvalidRequest

T = TypeVar("T")


def make_chat_renderer(
    template: str, bos_token: str, eos_token: str
) -> Callable[[list[Any]], list[tuple[str, bool]]]:
    """A function from OpenAI ``messages`` to the prompt text, generation prompt appended, as
    ``(text, is_template)`` parts: the template's own text, whose special-token text is meant as
    special tokens, and the messages' contents, which are plain text whatever they hold.

    It uses llama-cpp-python's sandboxed Jinja2 formatter, the one its own
    ``create_chat_completion`` uses, so the prompt matches what ``Llama`` renders. The parts come
    from a second rendering with each non-empty content replaced by a sentinel. Imported here, not
    at module top: loading llama_cpp is the engine's business.
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=template, bos_token=bos_token, eos_token=eos_token)
    # Nothing a client sends reaches the sentinel rendering (contents are replaced, roles are a
    # fixed set), so a sentinel found there is one of ours. Letters and digits only: a template
    # that trims or escapes a content leaves it whole.
    mark = "interlock" + secrets.token_hex(8)
    sentinel = re.compile(mark + r"x(\d+)x")

    def render(messages: list[Any]) -> list[tuple[str, bool]]:
        plain = [_plain_message(m) for m in messages]
        marked = [{**m, "content": f"{mark}x{i}x" if m["content"] else ""} for i, m in enumerate(plain)]
        try:
            # the formatter's messages are typed as the OpenAI TypedDicts; these are plain dicts of them
            want = formatter(messages=plain).prompt  # type: ignore[arg-type]
            pieces = sentinel.split(formatter(messages=marked).prompt)  # type: ignore[arg-type]
        except InvalidRequest:
            raise
        except Exception as exc:  # templates raise_exception() on role orders they refuse
            raise InvalidRequest(
                f"the chat template rejected these messages: {exc}", param="messages"
            ) from exc
        # pieces: template text, a message index, template text, ...
        contents = [str(plain[int(i)]["content"]) for i in pieces[1::2]]
        for form in (contents, [c.strip() for c in contents]):  # as given, or as a template trims
            parts = [(p, i % 2 == 0) for i, p in enumerate(_interleave(pieces[::2], form))]
            if "".join(p for p, _ in parts) == want:
                return parts
        # A template that changes contents some other way: its structure, the contents as given.
        return [(p, i % 2 == 0) for i, p in enumerate(_interleave(pieces[::2], contents))]

    return render


def _interleave(template: list[str], contents: list[str]) -> list[str]:
    out = [template[0]]
    for content, text in zip(contents, template[1:], strict=True):
        out += (content, text)
    return out


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
                raise InvalidRequest(
                    f"content parts of type {kind!r} are not supported by the llamacpp backend (text only)",
                    param="messages",
                )
            texts.append(str(part.get("text", "")))
        content = "".join(texts)
    elif content is None:
        content = ""
    role = message.get("role")
    # OpenAI's newer "developer" role means what templates call "system".
    return {"role": "system" if role == "developer" else role, "content": content}


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
        raise InvalidRequest(
            "input must be a string, a list of strings or a list of token lists", param="input"
        )
    if not items:
        raise InvalidRequest("input must not be empty", param="input")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(
            f"input holds {len(items)} items; at most {MAX_EMBEDDING_INPUTS} fit in one request",
            param="input",
        )
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise InvalidRequest(f"input {i} is an empty string", param="input")
        elif not (isinstance(item, list) and item and all(type(t) is int for t in item)):
            raise InvalidRequest(f"input {i} is neither a string nor a list of token ids", param="input")
        elif not all(0 <= t < n_vocab for t in item):
            raise InvalidRequest(
                f"input {i} holds a token id outside this model's vocabulary (0..{n_vocab - 1})",
                param="input",
            )
    return items


def embeddings_body(vectors: Sequence[Any], model: str, n_tokens: int, *, base64: bool) -> bytes:
    """The ``/v1/embeddings`` reply: unit vectors (numpy rows) as float lists, or as base64 of
    their little-endian float32 bytes (what the ``openai`` SDK asks for by default)."""
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": b64encode(v.astype("<f4").tobytes()).decode() if base64 else v.tolist(),
        }
        for i, v in enumerate(vectors)
    ]
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }
    )
