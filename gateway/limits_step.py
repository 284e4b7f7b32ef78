"""Limits in the request pipeline: admission before the router, settling when the reply ends.

``admit`` reserves, for every scope a request faces, one request, its prompt estimate plus its
``max_tokens`` (the route's default cap when it sets none, which is then sent upstream so that
the reply cannot outgrow its reservation), the most that could cost on the route's dearest
candidate, and a lease. ``Admission.follow`` then watches the answer: a whole reply settles on its
usage at once; a stream (``SettlingStream``) settles when it ends, however it ends, on the usage
chunk it asked the upstream for (``stream_options.include_usage``, dropped again on its way to a
client that did not ask) and never on fewer tokens than it relayed. A reply from the response
cache cost no upstream tokens: its reservation is given back whole.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from backends.base import Usage
from gateway.attempts import usage_from_tail
from gateway.errors import RateLimited
from gateway.limits import Decision, Limits
from gateway.limits_config import LimitsSection
from gateway.limits_reply import rate_headers, refusal
from gateway.router import Opened, Served
from gateway.snapshot import Route, Target

_TAIL = 4096
#: events in a stream that carry no token: the role chunk, the finish chunk, [DONE]
_FRAMING_EVENTS = 3


class Admission:
    """One admitted (or refused) request's hold on its limits, until it is settled."""

    __slots__ = ("_followed", "_limits", "body", "decision", "headers", "prompt_tokens", "strip_usage")

    def __init__(
        self, limits: Limits, decision: Decision, body: dict[str, Any], prompt_tokens: int, strip_usage: bool
    ) -> None:
        self._limits = limits
        self.decision = decision
        #: the body to send upstream (with max_tokens and include_usage where they were added)
        self.body = body
        self.prompt_tokens = prompt_tokens
        self.strip_usage = strip_usage
        self.headers = rate_headers(decision)
        self._followed = False

    def refused(self) -> RateLimited | None:
        if self.decision.admitted:
            return None
        self._limits.note_refused(self.decision)
        return refusal(self.decision)

    def follow(self, result: Served | Opened) -> Served | Opened:
        """Settle ``result`` when it ends: a whole reply now, a stream at its end."""
        self._followed = True
        if isinstance(result, Served):
            usage = result.reply.usage
            if usage is None:  # no count: the reservation stands
                self._limits.settle_soon(self.decision, self.decision_tokens(), None)
            else:
                self._limits.settle_soon(self.decision, usage.total_tokens, result.target.cost_usd(usage))
            return result
        stream = SettlingStream(self, result.target, result.first, result.rest)
        if self.strip_usage:  # a short reply can come whole in its first read, usage chunk and all
            result.first = stream._strip(result.first)
        result.rest = stream
        return result

    def decision_tokens(self) -> float:
        return max((c.cost for c in self.decision.checks if c.kind == "tpm"), default=0.0)

    def release(self) -> None:
        """Nothing was used (a refusal downstream, a failure, a reply from the cache)."""
        if not self._followed:
            self._followed = True
            self._limits.settle_soon(self.decision, None, None)

    def settle(self, tokens: float, usd: float | None) -> None:
        self._limits.settle_soon(self.decision, tokens, usd)


async def admit(
    limits: Limits,
    section: LimitsSection,
    key: str | None,
    route: Route,
    body: dict[str, Any],
    prompt_tokens: int,
    embeddings: bool,
) -> Admission | None:
    """The request's admission; None when no limit applies to it."""
    asked = body.get("max_completion_tokens") or body.get("max_tokens")
    reply_tokens = 0 if embeddings else int(asked or section.max_tokens_for(route.name))
    candidates = route.candidates()
    usd = (
        prompt_tokens * max(t.price.input_per_mtok for t in candidates)
        + reply_tokens * max(t.price.output_per_mtok for t in candidates)
    ) / 1e6
    checks = limits.plan(section, key, route.name, prompt_tokens + reply_tokens, usd, section.lease_ttl_s)
    if not checks:
        return None
    strip = False
    if any(c.kind in ("tpm", "usd") for c in checks) and not embeddings:
        body = dict(body)
        if asked is None:
            body["max_tokens"] = reply_tokens
        options = body.get("stream_options")
        if body.get("stream") and not (isinstance(options, dict) and options.get("include_usage")):
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
            strip = True
    decision = await limits.admit(checks)
    return Admission(limits, decision, body, prompt_tokens, strip)


def _is_usage_event(event: bytes) -> bool:
    return b'"usage"' in event and (b'"choices":[]' in event or b'"choices": []' in event)


class SettlingStream:
    """A stream's bytes on their way out, settling its admission exactly once at its end."""

    def __init__(
        self, admission: Admission, target: Target, first: bytes, chunks: AsyncIterator[bytes]
    ) -> None:
        self._admission = admission
        self._target = target
        self._chunks = chunks
        self._events = first.count(b"data:")
        self._tail = first[-_TAIL:]
        self._pending = b""
        self._open = True

    def __aiter__(self) -> SettlingStream:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if not self._open:
                raise StopAsyncIteration
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                self._end()
                if self._pending:  # a last event without its blank line: pass it on as it came
                    rest, self._pending = self._pending, b""
                    return rest
                raise
            except BaseException:
                self._end()
                raise
            self._events += chunk.count(b"data:")
            self._tail = (self._tail + chunk)[-_TAIL:]
            if not self._admission.strip_usage:
                return chunk
            out = self._strip(chunk)
            if out:
                return out

    def _strip(self, chunk: bytes) -> bytes:
        """``chunk`` without the usage event the client did not ask for; split events wait whole."""
        data = self._pending + chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._pending = data
            return b""
        whole, self._pending = data[: cut + 2], data[cut + 2 :]
        if b'"usage"' not in whole:
            return whole
        events = whole.split(b"\n\n")
        return b"".join(e + b"\n\n" for e in events[:-1] if not _is_usage_event(e))

    async def aclose(self) -> None:
        if self._open:
            self._end()
            await self._chunks.aclose()  # type: ignore[attr-defined]

    def _end(self) -> None:
        if not self._open:
            return
        self._open = False
        usage = usage_from_tail(self._tail)
        if usage is None:  # cut short, or an upstream that does not count: what went out, at least
            usage = Usage(self._admission.prompt_tokens, max(0, self._events - _FRAMING_EVENTS))
        self._admission.settle(usage.total_tokens, self._target.cost_usd(usage))
