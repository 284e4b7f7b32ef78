"""``kind: ollama``'s settings in the routing YAML, checked when the file is loaded."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from backends.base import BackendConfig
from backends.http import http_base_url
from backends.http_timeouts import TimeoutsConfig

#: a Go ``time.ParseDuration`` string, which is what Ollama accepts for a string keep_alive
_GO_DURATION = re.compile(r"^[-+]?(0|((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+)$")


class OllamaConfig(BackendConfig):
    """YAML: ``{kind: ollama, url: http://localhost:11434, model: llama3.2:3b, keep_alive: 10m}``."""

    kind: Literal["ollama"]
    #: the server's base URL, without ``/api`` or ``/v1``
    url: str
    #: the Ollama model name, as ``ollama pull`` takes it
    model: str = Field(min_length=1)
    #: seconds, or a duration string ("5m", "1h"); negative keeps the model loaded; None: Ollama's default
    keep_alive: str | int | None = None
    #: context size Ollama loads the model with; None: the Modelfile's or Ollama's default
    num_ctx: int | None = Field(default=None, ge=1)
    #: load the model when the gateway starts (requests fail fast with 503 while it loads)
    preload: bool = True
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = http_base_url(value)
        if value.endswith(("/v1", "/api")):
            raise ValueError(
                "must be the Ollama server's base URL, without /api or /v1 "
                "(for Ollama's OpenAI-compatible /v1 API use kind: openai)"
            )
        return value

    @field_validator("keep_alive")
    @classmethod
    def _duration(cls, value: str | int | None) -> str | int | None:
        if isinstance(value, str) and not _GO_DURATION.match(value.strip()):
            raise ValueError('must be a number of seconds or a duration such as "30s", "5m", "1h"')
        return value.strip() if isinstance(value, str) else value
