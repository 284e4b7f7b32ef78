"""``kind: openai``: hosted OpenAI or any OpenAI-compatible server (vLLM, llama.cpp's server, ...)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator

from backends.base import (
    ENDPOINT_PATHS,
    BackendConfig,
    BackendRequest,
    BackendResponse,
    Health,
    Load,
    Resources,
)
from backends.http import OpenAICompatibleUpstream, http_base_url
from backends.http_timeouts import TimeoutsConfig


class OpenAIConfig(BackendConfig):
    kind: Literal["openai"]
    base_url: str
    api_key: SecretStr | None = None
    #: the upstream's model name; unset sends the client's
    model: str | None = None
    organization: str | None = None
    project: str | None = None
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return http_base_url(value)


class OpenAIBackend:
    kind = "openai"

    def __init__(self, name: str, config: OpenAIConfig, resources: Resources) -> None:
        self.name = name
        self.config = config
        extra = {k: v.get_secret_value() for k, v in config.headers.items()}
        headers = {"content-type": "application/json", **extra}
        key = config.api_key.get_secret_value() if config.api_key else ""
        if key:
            headers["authorization"] = f"Bearer {key}"
        if config.organization:
            headers["openai-organization"] = config.organization
        if config.project:
            headers["openai-project"] = config.project
        self._upstream = OpenAICompatibleUpstream(
            http=resources.http,
            base_url=config.base_url,
            headers=headers,
            timeouts=config.timeouts.build(),
            # header values may be credentials too (x-api-key, api-key, ...)
            secrets=(
                *(s for s in (key, config.base_url, urlsplit(config.base_url).netloc) if s),
                *(v for v in extra.values() if len(v) >= 8),
            ),
        )
        self._in_flight = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _body(self, request: BackendRequest) -> dict[str, object]:
        if self.config.model is None:
            return request.body
        return {**request.body, "model": self.config.model}

    async def complete(self, request: BackendRequest) -> BackendResponse:
        self._in_flight += 1
        try:
            body, usage = await self._upstream.complete(
                ENDPOINT_PATHS[request.endpoint], self._body(request), request.request_id
            )
        finally:
            self._in_flight -= 1
        return BackendResponse(body=body, usage=usage)

    async def stream(self, request: BackendRequest) -> AsyncIterator[bytes]:
        self._in_flight += 1
        try:
            chunks = await self._upstream.stream(
                ENDPOINT_PATHS[request.endpoint], self._body(request), request.request_id
            )
        except BaseException:
            self._in_flight -= 1
            raise
        return self._counted(chunks)

    async def _counted(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self._in_flight -= 1
            await chunks.aclose()  # type: ignore[attr-defined]

    async def health(self) -> Health:
        """Reachable and not failing: ``GET {base_url}/models`` answers below 500.

        Any answer under 500 counts (401, 404 included): the server is up, and a server without
        /models is not a sick one. Requests, not checks, judge whether the key and model work.
        """
        return await self._upstream.probe("/models")

    def load(self) -> Load:
        return Load(in_flight=self._in_flight)

    def fatal(self) -> str | None:
        return None  # a remote server's faults are its own: health() reports them

    def describe(self) -> dict[str, object]:
        return {}
