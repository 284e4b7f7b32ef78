"""Hot reload of the routing YAML: validate the whole file, build what changed, swap, drain.

A reload (``POST /admin/reload``, SIGHUP, or a change of the watched file) loads the file
exactly as ``interlock check`` does. An invalid file changes nothing: its path-precise problems
are logged once, counted and remembered, and the last good config keeps serving. A valid one is
diffed against the snapshot in force: a backend whose config is equal (pydantic ``==``, secrets
included) keeps its object, so ``build_snapshot`` keeps its connections, loaded model, breaker,
stats and a pool's prefix indexes; new and changed ones are built and started *before* the swap
(a changed in-process model loads beside the old one), and a start that fails fails the reload
with nothing changed. The swap is one assignment: a request keeps the snapshot it started with.
Removed and replaced backends are out of the new snapshot, so they take no new requests; each is
closed once its target has nothing in flight, or after ``drain_s``, in the background.

``resilience`` applies in place: the retry budget's ratio and floor and the backoff are replaced
(the budget keeps its counts); breakers keep their state and take the new ``breaker`` settings;
``health_check`` applies at the next round (turning checks on or off from 0 takes a restart).

What is made of the file (validated, diffed, hashed) and the result a reload reports are
``gateway.reload_check``; ``POST /admin/reload`` and ``GET /admin/config`` are
``gateway.reload_http``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from backends.base import Backend, Resources
from backends.errors import InvalidRequest
from gateway.config import ConfigError, LoadedConfig, read_config
from gateway.reload_check import Prepared, ReloadResult, file_digest, prepare
from gateway.snapshot import Snapshot, Target, build_snapshot
from gateway.state import Gateway
from gateway.workers import single_process_problems

log = logging.getLogger("interlock.reload")

#: how often a draining backend's in-flight count is looked at
DRAIN_POLL_S = 0.1
#: a routing file up to this size is loaded on the event loop, a larger one in a worker thread.
#: Loading costs ~0.2 ms plus ~0.6 us a byte (4 KiB: ~2.5 ms). Under load the loop wants the GIL
#: all the time, so a thread holding it for less than the switch interval (5 ms) stalls the loop
#: just as long as the same work on the loop would, and the hop to the thread and back cost ~0.4
#: ms of CPU more per reload in the gateway (the benchmark's 300-byte file: ~1.4 ms of server CPU
#: per POST /admin/reload in a thread, ~0.95 inline); only a larger file gains from the thread
#: (the loop gets the GIL back every switch interval).
INLINE_MAX_BYTES = 4096


class ReloadInProgress(InvalidRequest):
    status = 409
    code = "reload_in_progress"

    def __init__(self) -> None:
        super().__init__("A reload is already running; try again when it has finished.")


class Reloader:
    def __init__(
        self,
        gateway: Gateway,
        path: str | None,
        resources: Resources,
        *,
        drain_s: float = 30.0,
        poll_s: float = 1.0,
    ) -> None:
        self.gateway = gateway
        #: the routing file; None: the embedded default, which has no file to reload
        self.path = path
        self.resources = resources
        self.drain_s = drain_s
        self.poll_s = poll_s
        #: reloads by result ("ok", "invalid", "failed", "unchanged"); dry runs are not counted
        self.results: collections.Counter[str] = collections.Counter()
        self.last_result: ReloadResult | None = None
        #: the latest attempt's error (None once one succeeds) and when it was made (wall clock)
        self.last_error: str | None = None
        self.last_attempt_at: float | None = None
        #: polls of the watched file so far
        self.polls = 0
        #: replaced or removed targets waiting for their requests to finish before close()
        self.draining: list[Target] = []
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        #: the content hash of the file as last attempted: the watcher loads only other content
        self._attempted: str | None = None
        #: with Redis: every replica's config hash (``gateway.config_peers.ConfigPeers``)
        self.peers: Any = None
        #: the gateway's worker processes: a config they cannot all run is invalid
        self.workers = 1
        #: called after ``POST /admin/reload`` put a file in force (or found it so): the other
        #: workers reload too (``gateway.workers.reload_siblings``)
        self.after_admin_reload: Callable[[], None] | None = None

    # -- triggers -----------------------------------------------------------------------------

    def start_watching(self) -> None:
        """Poll the file every ``poll_s`` in the background (from inside the running loop)."""
        if self.path is not None and self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_file(Path(self.path)))

    @property
    def watching(self) -> bool:
        return self._watch is not None and not self._watch.done()

    def trigger(self, trigger: str) -> None:
        """Reload in the background (a signal handler's call); waits for a reload already running."""
        self._spawn(self._triggered(trigger))

    async def _triggered(self, trigger: str) -> None:
        try:
            await self.reload(trigger=trigger, wait=True)
        except Exception:
            log.exception("reload on %s failed", trigger)

    async def _watch_file(self, path: Path) -> None:
        # Only content seen unchanged on two polls in a row is loaded: a file still being written
        # is skipped until the writer stops (an editor's write-and-rename is one change).
        previous = await asyncio.to_thread(file_digest, path)
        if self._attempted is None:
            self._attempted = previous
        while True:
            await asyncio.sleep(self.poll_s)
            digest = await asyncio.to_thread(file_digest, path)
            self.polls += 1
            if digest is not None and digest == previous and digest != self._attempted:
                try:
                    await self.reload(trigger="watch", wait=True)
                except Exception:
                    log.exception("reload of the watched file failed")
                    self._attempted = digest  # do not try the same content every second
            previous = digest

    # -- the reload ---------------------------------------------------------------------------

    async def reload(
        self, *, dry_run: bool = False, trigger: str = "admin", wait: bool = False
    ) -> ReloadResult:
        """Validate the file and, unless ``dry_run``, put it in force. One at a time: raises
        ``ReloadInProgress`` while another runs (``wait``: queue behind it instead)."""
        if self.path is None:
            raise InvalidRequest(
                "This gateway serves the embedded default, which has no routing file to "
                "reload; start it with --config FILE (INTERLOCK_CONFIG).",
                code="reload_unavailable",
            )
        if dry_run:
            return (await self._check(trigger, dry_run=True))[0]
        if self._lock.locked() and not wait:
            raise ReloadInProgress()
        async with self._lock:
            result, config = await self._check(trigger, dry_run=False)
            if config is not None and result.status == "ok":
                await self._apply(result, config)
                if self.peers is not None:
                    self.peers.publish_soon()
            self._remember(result)
            if trigger == "admin" and result.status in ("ok", "unchanged") and self.after_admin_reload:
                self.after_admin_reload()
            return result

    async def _check(self, trigger: str, *, dry_run: bool) -> tuple[ReloadResult, LoadedConfig | None]:
        """The file loaded and diffed against the snapshot in force (the config None if invalid)."""
        assert self.path is not None
        old = self.gateway.snapshot
        result = ReloadResult(
            status="ok", source=self.path, trigger=trigger, dry_run=dry_run, previous_hash=old.hash
        )
        source = str(Path(self.path))  # as load_config names it
        try:
            raw = read_config(source)  # a local file of a few KiB: ~10 us, not worth a thread
        except ConfigError as exc:
            loaded = Prepared(None, error=exc)
        else:
            if len(raw) <= INLINE_MAX_BYTES:
                loaded = prepare(raw, source, old.config)
            else:
                loaded = await asyncio.to_thread(prepare, raw, source, old.config)
        if not dry_run:
            self._attempted = loaded.digest
        new = loaded.config
        if new is None:
            assert loaded.error is not None
            result.status, result.problems = "invalid", loaded.error.problems
            return result, None
        problems = single_process_problems(new, self.workers)
        if problems:
            result.status, result.problems = "invalid", problems
            return result, None
        result.diff, result.hash = loaded.diff, loaded.hash
        if "cache" in result.diff["sections_changed"]:
            result.notes.append("cache: the top-level section applies after a restart")
        if result.hash == old.hash:
            result.status = "unchanged"
        return result, new

    async def _apply(self, result: ReloadResult, new: LoadedConfig) -> None:
        old = self.gateway.snapshot
        diff = result.diff
        fresh_names = diff["backends_added"] + diff["backends_changed"]
        fresh = await self._start(new, fresh_names, result)
        if fresh is None:
            return
        backends: dict[str, Backend] = {
            name: fresh[name] if name in fresh else old.targets[name].backend for name in new.backends
        }
        snapshot = build_snapshot(new, backends, previous=old, known_hash=result.hash)
        self._apply_resilience(old, snapshot, result)
        # Checked before the swap, so readiness never sees a target of the snapshot in force as
        # "starting" and the router knows its health from its first request.
        await asyncio.gather(*(self.gateway.health.started(snapshot.targets[n]) for n in fresh))
        self.gateway.swap(snapshot)
        for name in diff["backends_removed"] + diff["backends_changed"]:
            self._retire(old.targets[name])

    async def _start(
        self, new: LoadedConfig, names: list[str], result: ReloadResult
    ) -> dict[str, Backend] | None:
        """The backends ``names`` of ``new``, built and started; None (with ``result`` failed and
        every one closed again) when one cannot be built or started."""
        from gateway.server import build_backends  # the server imports this module

        if not names:
            return {}
        try:
            fresh = build_backends(
                dataclasses.replace(new, backends={n: new.backends[n] for n in names}), self.resources
            )
        except Exception as exc:
            result.status, result.reason = "failed", f"cannot build the new backends: {exc}"
            return None
        outcomes = await asyncio.gather(*(b.start() for b in fresh.values()), return_exceptions=True)
        failures = [
            f"backends.{name}: failed to start: {outcome}"
            for name, outcome in zip(fresh, outcomes, strict=True)
            if isinstance(outcome, BaseException)
        ]
        if failures:
            await asyncio.gather(*(b.close() for b in fresh.values()), return_exceptions=True)
            result.status, result.reason = "failed", "; ".join(failures)
            return None
        return fresh

    def _apply_resilience(self, old: Snapshot, new: Snapshot, result: ReloadResult) -> None:
        resilience = new.config.resilience
        for target in new.targets.values():
            target.breaker.reconfigure(resilience.breaker)
        retry, router = resilience.retry, self.gateway.router
        if retry != old.config.resilience.retry:
            router.budget.ratio, router.budget.min_per_s = retry.budget_ratio, retry.budget_min_per_s
            router.set_backoff(retry.backoff_initial_s, retry.backoff_max_s)
        check, health = resilience.health_check, self.gateway.health
        health.timeout_s = check.timeout_s
        if (check.interval_s > 0) == (health.interval_s > 0):
            health.interval_s = check.interval_s
        else:
            result.notes.append(
                "resilience.health_check.interval_s: turning active checks on or off takes a restart"
            )

    def _retire(self, target: Target) -> None:
        self.draining.append(target)
        self._spawn(self._drain(target))

    async def _drain(self, target: Target) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_s
        try:
            # polled: the stats count requests, they signal nothing
            while loop.time() < deadline:
                if target.stats.in_flight == 0:
                    break
                await asyncio.sleep(DRAIN_POLL_S)
            if target.stats.in_flight > 0:
                log.warning(
                    "backend %s (replaced by a reload) still has %d request(s) in flight after "
                    "%gs; closing it",
                    target.name,
                    target.stats.in_flight,
                    self.drain_s,
                )
        finally:
            self.draining.remove(target)
            try:
                await target.backend.close()
            except Exception:
                log.exception("closing backend %s after a reload failed", target.name)

    def _remember(self, result: ReloadResult) -> None:
        self.results[result.status] += 1
        self.last_result, self.last_attempt_at = result, result.at
        self.last_error = None
        if result.status == "invalid":
            self.last_error = str(ConfigError(result.source, result.problems))
            log.warning(
                "reload (%s) rejected, the last good config keeps serving: %s",
                result.trigger,
                self.last_error,
            )
        elif result.status == "failed":
            self.last_error = result.reason
            log.error(
                "reload (%s) failed, the last good config keeps serving: %s", result.trigger, result.reason
            )
        elif result.status == "ok":
            changes = {k: v for k, v in result.diff.items() if v and k != "backends_kept"}
            log.info(
                "reload (%s): config %s in force (was %s): %s",
                result.trigger,
                (result.hash or "")[:12],
                result.previous_hash[:12],
                changes or "no backend or model changed",
            )

    # -- lifetime -----------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Stop watching and close every draining backend now (the process is stopping)."""
        tasks = [*self._tasks, *([self._watch] if self._watch else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
