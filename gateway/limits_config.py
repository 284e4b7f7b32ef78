"""``limits:`` in the routing YAML: requests, tokens, dollars and parallel requests per client key.

    limits:
      default_max_tokens: 1024          # reserved when a request sets no max_tokens (and sent as it)
      route_max_tokens: {chat: 512}     # the same, per route
      keys:
        team-a:                         # a name from auth.keys; "*" is every key (and, without
          rpm: 600                      # keys, every client)
          tpm: 200000
          usd: {amount: 50, period: 1d}
          max_parallel: 16
          on_redis_failure: local       # local (default) | open | closed
          models:
            chat: {rpm: 60, tpm: 40000} # key x model

Cross-checks against the rest of the file (key and model names) are in ``cross_check``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: the limits block that applies to every key without one of its own
EVERY_KEY = "*"

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """``30`` (seconds), ``"500ms"``, ``"90s"``, ``"5m"``, ``"1h"`` or ``"1d"`` as seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like 90s, 5m, 1h, 1d")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value.strip())):
        seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration; use seconds or a string like 90s, 5m, 1h, 1d")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


class UsdBudget(BaseModel):
    """Dollars per period, refilled evenly over it (a token bucket of dollars)."""

    model_config = ConfigDict(extra="forbid")
    amount: float = Field(gt=0)
    #: seconds, or ``1h`` / ``1d`` / ``30d``
    period: float = 86400.0

    @field_validator("period", mode="before")
    @classmethod
    def _period(cls, value: Any) -> float:
        return parse_duration(value)


RedisFailure = Literal["local", "open", "closed"]


class LimitSet(BaseModel):
    """The limits of one scope (a key, or a key x model); each one left out does not apply."""

    model_config = ConfigDict(extra="forbid")
    #: requests per minute, by GCRA: a steady pace with a burst of at most ``burst``
    rpm: int | None = Field(default=None, gt=0)
    #: how many requests may come at once after a quiet spell (default: rpm)
    burst: int | None = Field(default=None, gt=0)
    #: tokens per minute (prompt + completion), reserved on admission and settled on the reply
    tpm: int | None = Field(default=None, gt=0)
    usd: UsdBudget | None = None
    #: requests in flight at once (across replicas: leases with a TTL)
    max_parallel: int | None = Field(default=None, gt=0)
    #: what this scope does while Redis is slow or gone: ``local`` enforces limit / live replicas
    #: in each replica, ``open`` admits, ``closed`` refuses (a 429, never a 5xx)
    on_redis_failure: RedisFailure = "local"

    @field_validator("burst")
    @classmethod
    def _burst_needs_rpm(cls, value: int | None, info: Any) -> int | None:
        if value is not None and info.data.get("rpm") is None:
            raise ValueError("burst needs rpm")
        return value

    def empty(self) -> bool:
        return self.rpm is None and self.tpm is None and self.usd is None and self.max_parallel is None


class KeyLimits(LimitSet):
    #: per model (a route name) for this key, on top of the key's own limits
    models: dict[str, LimitSet] = Field(default_factory=dict)


class LimitsSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: dict[str, KeyLimits] = Field(default_factory=dict)
    #: reserved (and sent upstream as ``max_tokens``) when a request sets none
    default_max_tokens: int = Field(default=1024, gt=0)
    #: the same, per route
    route_max_tokens: dict[str, int] = Field(default_factory=dict)
    #: a max_parallel lease held by a replica that stopped renewing it expires after this
    lease_ttl_s: float = Field(default=30.0, ge=1)
    #: Redis must answer a limit check within this, or the scope's ``on_redis_failure`` applies
    redis_timeout_ms: float = Field(default=10.0, gt=0, le=5000)
    #: how often each replica says it is alive (and renews its leases)
    heartbeat_s: float = Field(default=1.0, gt=0, le=60)

    @field_validator("route_max_tokens")
    @classmethod
    def _positive(cls, value: dict[str, int]) -> dict[str, int]:
        for model, cap in value.items():
            if cap <= 0:
                raise ValueError(f"route_max_tokens.{model} must be positive")
        return value

    @model_validator(mode="after")
    def _leases_outlive_beats(self) -> LimitsSection:
        if self.lease_ttl_s < 2 * self.heartbeat_s:
            raise ValueError("lease_ttl_s must be at least twice heartbeat_s, or live leases expire")
        return self

    def configured(self) -> bool:
        return any(not k.empty() or any(not m.empty() for m in k.models.values()) for k in self.keys.values())

    def max_tokens_for(self, route: str) -> int:
        return self.route_max_tokens.get(route, self.default_max_tokens)


def cross_check(raw: Any, key_names: list[str], models: list[str]) -> list[tuple[str, str]]:
    """Problems (yaml path, message) of names that ``limits`` uses but the file does not define.
    Read from the raw section, so that a section with other errors still has these checked."""
    problems: list[tuple[str, str]] = []
    if not isinstance(raw, dict):
        return problems
    keys = raw.get("keys")
    for name, limits in keys.items() if isinstance(keys, dict) else ():
        where = f"limits.keys.{name}"
        if name != EVERY_KEY and name not in key_names:
            known = ", ".join(key_names) if key_names else "none: without auth.keys only '*' applies"
            problems.append((where, f"unknown client key {name!r} (auth.keys: {known})"))
        per_model = limits.get("models") if isinstance(limits, dict) else None
        for model in per_model if isinstance(per_model, dict) else ():
            if model not in models:
                problems.append((f"{where}.models.{model}", f"unknown model {model!r}"))
    caps = raw.get("route_max_tokens")
    for model in caps if isinstance(caps, dict) else ():
        if model not in models:
            problems.append((f"limits.route_max_tokens.{model}", f"unknown model {model!r}"))
    return problems
