"""OpenAI request bodies → Ollama's native API (/api/chat, /api/generate, /api/embed).

Pure translation, no I/O: ``backends.ollama`` (the backend: config, HTTP, errors, health, loading,
stream transport) builds the Ollama payload with ``request_payload`` / ``embed_payload``, and
``backends.ollama.reply`` turns Ollama's replies back into OpenAI's shapes. Written from
Ollama's API reference (https://github.com/ollama/ollama/blob/main/docs/api.md); the section
numbers (§) count that document's endpoint sections in order (generate, chat, ..., embed).

What follows the reference
    * chat → ``POST /api/chat`` (§1): roles (``developer`` → ``system``, legacy ``function`` →
      ``tool``), text content parts joined, ``image_url`` parts given as base64 ``data:`` URLs →
      ``images`` (raw base64), ``tools`` passed through (same shape), assistant ``tool_calls``
      with their JSON-string arguments parsed into objects, tool results carry ``tool_name``
      looked up from the call id. ``response_format`` ``json_object`` → ``format: "json"``,
      ``json_schema`` → ``format: <schema>``; ``reasoning_effort`` → ``think`` (``none`` → false).
    * text completions → ``POST /api/generate`` (§2) with ``raw: true`` (an OpenAI completion
      continues the text as given, as vLLM and the llamacpp backend do), except with ``suffix``,
      which needs the model's template to build the fill-in-the-middle prompt (``raw: false``).
    * embeddings → ``POST /api/embed`` (§3): ``input`` string or list of strings, ``dimensions``.
    * options (§5): ``temperature``, ``top_p``, ``seed``, ``presence_penalty``,
      ``frequency_penalty`` keep their names; ``stop`` → list; ``max_completion_tokens`` /
      ``max_tokens`` → ``num_predict``; ``num_ctx`` from the config; vLLM-style extras ``top_k``,
      ``min_p``, ``repeat_penalty`` pass through (type-checked here: a wrong type is a 500 from
      Ollama, which would count against the breaker). Fields a client leaves out are not sent, so
      the Modelfile's defaults apply (Ollama's /v1 layer sends temperature/top_p 1.0 instead).
      ``keep_alive`` from the config goes top-level.

Not supported (a clear 400 naming the parameter): ``n`` > 1, ``logprobs`` / ``top_logprobs``,
``logit_bias``, ``echo``, ``best_of`` > 1, ``tool_choice`` other than ``auto`` / ``none``
(``none`` drops the tools), image URLs that are not base64 ``data:`` URLs and other non-text
content parts, several prompts in one completion request, token-id prompts and embedding inputs.
Ignored: ``user``, ``parallel_tool_calls``, ``stream_options`` other than ``include_usage``.
Not used: ``/api/embeddings`` (legacy), ``context``, ``template``/``system`` overrides.
"""

from __future__ import annotations

from typing import Any

import orjson

from backends.errors import InvalidRequest


def load_fields(num_ctx: int | None, keep_alive: str | int | None) -> dict[str, Any]:
    """What every request carries so that Ollama keeps (not reloads) the same model instance."""
    out: dict[str, Any] = {}
    if num_ctx is not None:
        out["options"] = {"num_ctx": num_ctx}
    if keep_alive is not None:
        out["keep_alive"] = keep_alive
    return out


def request_payload(
    body: dict[str, Any],
    endpoint: str,
    *,
    model: str,
    stream: bool,
    num_ctx: int | None,
    keep_alive: str | int | None,
) -> tuple[str, dict[str, Any]]:
    """An OpenAI chat / completions / embeddings body → Ollama's path and payload (bad input: 400)."""
    if endpoint == "embeddings":
        return "/api/embed", embed_payload(body, model=model, num_ctx=num_ctx, keep_alive=keep_alive)
    _refuse_unsupported(body, endpoint)
    payload: dict[str, Any] = {"model": model, "stream": stream}
    if endpoint == "chat":
        payload["messages"] = _messages(body.get("messages"))
        tools = body.get("tools")
        if tools and body.get("tool_choice") != "none":
            payload["tools"] = tools
        fmt = _format(body.get("response_format"))
        if fmt is not None:
            payload["format"] = fmt
        think = _think(body.get("reasoning_effort"))
        if think is not None:
            payload["think"] = think
        path = "/api/chat"
    else:
        payload["prompt"] = _prompt(body.get("prompt"))
        suffix = body.get("suffix")
        if suffix:
            payload["suffix"] = suffix
        payload["raw"] = not suffix
        path = "/api/generate"
    load_options = {"num_ctx": num_ctx} if num_ctx is not None else {}
    options = {**_sampling(body, endpoint), **load_options}
    if options:
        payload["options"] = options
    if keep_alive is not None:
        payload["keep_alive"] = keep_alive
    return path, payload


def embed_payload(
    body: dict[str, Any], *, model: str, num_ctx: int | None, keep_alive: str | int | None
) -> dict[str, Any]:
    value = body.get("input")
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise InvalidRequest(
            "token-id inputs are not supported by the ollama backend; send text", param="input"
        )
    if not isinstance(value, str | list):
        raise InvalidRequest("input must be a string or a list of strings", param="input")
    payload: dict[str, Any] = {"model": model, "input": value, **load_fields(num_ctx, keep_alive)}
    if body.get("dimensions") is not None:
        payload["dimensions"] = body["dimensions"]
    return payload


def _refuse_unsupported(body: dict[str, Any], endpoint: str) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidRequest(
            "n > 1 is not supported by the ollama backend (one choice per request)", param="n"
        )
    if body.get("logprobs") not in (None, False):
        raise InvalidRequest("logprobs are not supported by the ollama backend", param="logprobs")
    if body.get("top_logprobs") not in (None, 0):
        raise InvalidRequest("top_logprobs are not supported by the ollama backend", param="top_logprobs")
    if body.get("logit_bias"):
        raise InvalidRequest("logit_bias is not supported by the ollama backend", param="logit_bias")
    if endpoint == "completions":
        if body.get("echo"):
            raise InvalidRequest("echo is not supported by the ollama backend", param="echo")
        if body.get("best_of") not in (None, 1):
            raise InvalidRequest("best_of > 1 is not supported by the ollama backend", param="best_of")
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise InvalidRequest(
            "tool_choice must be auto or none with the ollama backend (Ollama lets the model decide)",
            param="tool_choice",
        )


#: vLLM-style sampling extras an Ollama option of the same meaning exists for: name -> (option, type)
_EXTRAS: dict[str, tuple[str, type]] = {
    "top_k": ("top_k", int),
    "min_p": ("min_p", float),
    "repeat_penalty": ("repeat_penalty", float),
    "repetition_penalty": ("repeat_penalty", float),
}


def _sampling(body: dict[str, Any], endpoint: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
        if body.get(key) is not None:
            options[key] = body[key]
    for key, (option, kind) in _EXTRAS.items():
        value = body.get(key)
        if value is None:
            continue
        ok = type(value) is int if kind is int else type(value) in (int, float)
        if not ok:
            raise InvalidRequest(f"{key} must be {'an integer' if kind is int else 'a number'}", param=key)
        options[option] = value
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    if stops:
        options["stop"] = stops
    limit = body.get("max_completion_tokens") if endpoint == "chat" else None
    if limit is None:
        limit = body.get("max_tokens")
    if limit is not None:
        options["num_predict"] = limit
    return options


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    out: list[dict[str, Any]] = []
    tool_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest("each message must be an object", param=where)
        role = message.get("role")
        text, images = _content(message.get("content"), where)
        entry: dict[str, Any] = {
            "role": {"developer": "system", "function": "tool"}.get(str(role), role),
            "content": text,
        }
        if images:
            entry["images"] = images
        for call in message.get("tool_calls") or ():
            entry.setdefault("tool_calls", []).append(_tool_call_in(call, f"{where}.tool_calls"))
            call_id, fn = call.get("id"), call.get("function") or {}
            if isinstance(call_id, str) and isinstance(fn.get("name"), str):
                tool_names[call_id] = fn["name"]
        if role == "tool":
            call_id = message.get("tool_call_id")
            if isinstance(call_id, str):
                entry["tool_call_id"] = call_id
                if call_id in tool_names:
                    entry["tool_name"] = tool_names[call_id]
        elif role == "function" and isinstance(message.get("name"), str):
            entry["tool_name"] = message["name"]
        out.append(entry)
    return out


def _content(content: Any, where: str) -> tuple[str, list[str]]:
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise InvalidRequest("content must be a string or a list of parts", param=f"{where}.content")
    texts: list[str] = []
    images: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            images.append(_image(part.get("image_url"), f"{where}.content"))
        else:
            raise InvalidRequest(
                f"content parts of type {kind!r} are not supported by the ollama backend "
                "(text and base64 image_url only)",
                param=f"{where}.content",
            )
    return "".join(texts), images


def _image(value: Any, where: str) -> str:
    url = value.get("url") if isinstance(value, dict) else value
    if isinstance(url, str) and url.startswith("data:"):
        header, sep, data = url.partition(",")
        if sep and header.endswith(";base64") and data:
            return data
    raise InvalidRequest(
        "the ollama backend takes images as base64 data: URLs "
        "(data:image/png;base64,...), not links it would have to fetch",
        param=where,
    )


def _tool_call_in(call: Any, where: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequest("each tool call needs a function with a name", param=where)
    arguments = fn.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = orjson.loads(arguments) if arguments.strip() else {}
        except orjson.JSONDecodeError:
            raise InvalidRequest("tool call arguments must be a JSON object", param=where) from None
    if not isinstance(arguments, dict):
        raise InvalidRequest("tool call arguments must be a JSON object", param=where)
    out: dict[str, Any] = {"function": {"name": fn["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _format(response_format: Any) -> Any:
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest(
                "response_format json_schema needs json_schema.schema (an object)", param="response_format"
            )
        return schema
    raise InvalidRequest("response_format must be text, json_object or json_schema", param="response_format")


def _think(effort: Any) -> bool | str | None:
    if effort is None:
        return None
    if effort == "none":
        return False
    if effort in ("low", "medium", "high"):
        return str(effort)
    raise InvalidRequest(
        "reasoning_effort must be none, low, medium or high with the ollama backend", param="reasoning_effort"
    )


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise InvalidRequest(
            "several prompts in one request are not supported by the ollama backend "
            "(send one request per prompt)",
            param="prompt",
        )
    raise InvalidRequest(
        "the ollama backend takes the prompt as text (a string or a list of one string), not token ids",
        param="prompt",
    )
