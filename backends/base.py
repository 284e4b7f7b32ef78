"""The one seam between the gateway and every kind of backend.

A backend turns an OpenAI-shaped request into an OpenAI-shaped reply. The gateway
validates the request first, so a backend sees well-formed bodies only; it maps
its own library's failures into ``backends.errors`` at its edge.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

Endpoint = Literal["chat", "completions", "embeddings"]

#: the path each endpoint has on an OpenAI-compatible server
ENDPOINT_PATHS: dict[str, str] = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}


@dataclass(slots=True)
class BackendRequest:
    """A validated client request, ready for a backend.

    ``body`` is the client's JSON object as received, unknown OpenAI fields
    included; backends replace ``model`` with their upstream model name and pass
    the rest on where their server accepts it.
    """

    endpoint: Endpoint
    body: dict[str, Any]
    request_id: str
    stream: bool = False
    #: the client's ``x-interlock-session`` header: a conversation key pools may keep together
    session: str | None = None


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class BackendResponse:
    """A complete, non-streamed reply: the OpenAI JSON body as bytes, relayed as-is."""

    body: bytes
    usage: Usage | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Health:
    ok: bool
    reason: str = ""
    #: the backend is up but misconfigured (a model not pulled, say): not ready, yet not an outage
    #: for its circuit breaker to count
    misconfigured: bool = False


@dataclass(slots=True)
class Load:
    """What a policy may know about how busy a backend is right now."""

    in_flight: int = 0
    queued: int = 0
    capacity: int | None = None
    #: its own queue is full: a request now would be refused, so the router skips it unasked
    full: bool = False


@runtime_checkable
class Backend(Protocol):
    """What the router needs of a backend. ``kind`` is the YAML ``kind``."""

    name: str
    kind: str

    async def start(self) -> None:
        """Acquire resources (load a model, open pools). Called once before serving."""

    async def close(self) -> None:
        """Release everything; in-flight work may be cancelled."""

    async def complete(self, request: BackendRequest) -> BackendResponse:
        """Serve a non-streamed request. Raises ``backends.errors.InterlockError``."""

    async def stream(self, request: BackendRequest) -> AsyncIterator[bytes]:
        """Open a streamed request.

        Awaiting this sends the request and raises if the upstream refuses it
        (so the router can still fall back); the returned iterator yields
        OpenAI SSE bytes (``data: {...}\\n\\n`` ... ``data: [DONE]\\n\\n``) as they
        arrive. A failure while iterating raises ``InterlockError``; the gateway
        turns it into an in-stream error event. Closing the iterator early
        (client gone) must cancel the upstream work.
        """

    async def health(self) -> Health:
        """Whether this backend can take requests now, with a reason if not."""

    def load(self) -> Load:
        """Cheap, synchronous snapshot for policies; no I/O."""

    def fatal(self) -> str | None:
        """A fault this process cannot recover from without a restart (the in-process engine
        thread died); None when there is none."""

    def describe(self) -> dict[str, Any]:
        """What only this kind knows, for operators (``/admin/routes``, ``interlock routes``):
        a pool's endpoints, a model's queue. Cheap and synchronous; no secrets."""


class Price(BaseModel):
    """USD per million tokens; 0 for self-hosted unless an operator says otherwise."""

    model_config = ConfigDict(extra="forbid")
    input_per_mtok: float = Field(default=0.0, ge=0)
    output_per_mtok: float = Field(default=0.0, ge=0)


class BackendConfig(BaseModel):
    """Fields every backend kind accepts; each kind subclasses it with ``kind: Literal[...]``."""

    model_config = ConfigDict(extra="forbid")
    price: Price = Field(default_factory=Price)
    #: load shedding: requests this gateway sends it at once; beyond, the router tries the next
    #: candidate, and when every candidate is full the client gets 429 with Retry-After
    max_in_flight: int | None = Field(default=None, ge=1)


@dataclass(slots=True)
class Resources:
    """Process-wide things a backend may borrow: the one HTTP client, later a clock or Redis."""

    http: Any = None  # backends.http.HttpClient; typed loosely so base imports no aiohttp
