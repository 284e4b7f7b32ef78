"""What a reload makes of a routing file: validated, diffed against the config in force, hashed.

``prepare`` does all of it from the file's bytes in one go (on the event loop or in a worker
thread: ``gateway.reload`` decides by the file's size), so the loop is left a swap of prepared
objects. ``config_diff`` names the backends and models added, removed, changed and kept (by
config equality, secrets included). ``ReloadResult`` is what a reload reports, to the log, to
``POST /admin/reload`` and ``GET /admin/config`` (``gateway.reload_http``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from backends.errors import InterlockError, InvalidRequest
from gateway.config import ConfigError, LoadedConfig, config_from_bytes
from gateway.snapshot import config_hash

Status = Literal["ok", "invalid", "failed", "unchanged"]


@dataclasses.dataclass(slots=True)
class ReloadResult:
    status: Status
    source: str
    trigger: str = "admin"
    dry_run: bool = False
    #: (yaml path, message) pairs, as ``interlock check`` prints them
    problems: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    #: why a valid file could not be put in force (a backend that would not start)
    reason: str = ""
    diff: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: what does not apply until a restart
    notes: list[str] = dataclasses.field(default_factory=list)
    previous_hash: str = ""
    hash: str | None = None
    at: float = dataclasses.field(default_factory=time.time)

    def to_dict(self) -> dict[str, object]:
        return {
            "status": self.status,
            "source": self.source,
            "trigger": self.trigger,
            "dry_run": self.dry_run,
            "problems": [{"path": path, "message": message} for path, message in self.problems],
            "reason": self.reason,
            "diff": self.diff,
            "notes": self.notes,
            "previous_hash": self.previous_hash,
            "hash": self.hash,
            "at": self.at,
        }

    def error(self) -> InterlockError | None:
        """The OpenAI-shaped error an HTTP caller gets for this result; None when it succeeded."""
        if self.status == "invalid":
            lines = "; ".join(f"{p}: {m}" if p else m for p, m in self.problems)
            return InvalidRequest(
                f"{self.source}: {len(self.problems)} problem(s): {lines}", code="invalid_config"
            )
        if self.status == "failed":
            return InterlockError(self.reason, code="reload_failed")
        return None


def config_diff(old: LoadedConfig, new: LoadedConfig) -> dict[str, list[str]]:
    """Backends and models added, removed, changed (by config equality) and, for backends, kept."""

    def split(a: Mapping[str, object], b: Mapping[str, object]) -> tuple[list[str], ...]:
        return (
            [n for n in b if n not in a],
            [n for n in a if n not in b],
            [n for n in b if n in a and a[n] != b[n]],
            [n for n in b if n in a and a[n] == b[n]],
        )

    b_added, b_removed, b_changed, b_kept = split(old.backends, new.backends)
    m_added, m_removed, m_changed, _ = split(old.models, new.models)
    sections = [name for name in ("auth", "resilience", "cache") if getattr(old, name) != getattr(new, name)]
    return {
        "backends_added": b_added,
        "backends_removed": b_removed,
        "backends_changed": b_changed,
        "backends_kept": b_kept,
        "models_added": m_added,
        "models_removed": m_removed,
        "models_changed": m_changed,
        "sections_changed": sections,
    }


def file_digest(path: Path) -> str | None:
    """The sha256 of the file's content (the watcher's view of it); None when it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:  # mid-rename, or removed: the next poll looks again
        return None


@dataclasses.dataclass(slots=True)
class Prepared:
    """A routing file as a reload found it: the config, or the error that rejected it."""

    #: sha256 of the bytes loaded (None: the file could not be read)
    digest: str | None
    config: LoadedConfig | None = None
    error: ConfigError | None = None
    diff: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    hash: str = ""


def prepare(raw: bytes, source: str, old: LoadedConfig) -> Prepared:
    """Everything a reload works out from the file's bytes: parsed, validated, diffed against
    ``old`` (only read: it is immutable) and hashed, so the event loop is left a swap of prepared
    objects. The digest is of these very bytes: the watcher compares it with the file's."""
    digest = hashlib.sha256(raw).hexdigest()
    try:
        new = config_from_bytes(raw, source)
    except ConfigError as exc:
        return Prepared(digest, error=exc)
    return Prepared(digest, new, diff=config_diff(old, new), hash=config_hash(new))
