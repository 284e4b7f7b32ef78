"""``interlock serve --workers N``: N gateway processes on one listening socket.

The supervisor (the process ``interlock serve`` started) loads and checks the config, binds the
port once and forks N workers; each runs the whole gateway (its own event loop, HTTP client,
breakers, latency stats, caches) and accepts from the shared socket, as gunicorn's and uvicorn's
workers do: a busy worker is slower to accept, so new connections lean to the idle one. The
supervisor starts no event loop and no thread, so forking it is safe, and it serves nothing: it
only waits for signals (``sigtimedwait``, which also says which process sent one).

Signals to the supervisor:

- SIGTERM, SIGINT: passed to every worker, each of which drains as a single gateway does
  (readiness 503 for ``shutdown_delay_s``, then a graceful shutdown); the supervisor exits once
  all have. A second one is passed on too (the workers skip the rest of the delay).
- SIGHUP: passed to every worker: each reloads the routing file.
- SIGUSR1, from a worker that reloaded on ``POST /admin/reload``: SIGHUP to the other workers,
  so one admin call reloads them all (each watches the file as well).

A worker that dies otherwise (killed, crashed, an exit of 0 nobody asked for) is replaced, after
a back-off that grows while replacements keep dying young. One that exits with a start-up
failure (1: a backend could not start; 2: a bad setting; 3: uvicorn could not start) stops the
rest and the supervisor exits with its code: a replacement would fail the same way.

The worker count and the caveats of several processes (what is per worker, ``/metrics``) are
for ``gateway.server``; this module only runs processes.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.config import LoadedConfig
from gateway.settings import Settings

log = logging.getLogger("interlock.workers")

HANDLED = frozenset({signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1})
#: exit codes that say the worker could not start: replacing it would fail the same way
START_FAILURES = frozenset({1, 2, 3})
#: a worker that lived less than this died young: the next replacement waits longer
YOUNG_S = 10.0
BACKOFF_MAX_S = 30.0
#: backend kinds whose model lives inside the gateway process: one process, one model
IN_PROCESS_KINDS = frozenset({"llamacpp"})


def single_process_problems(config: LoadedConfig, workers: int) -> list[tuple[str, str]]:
    """What in ``config`` cannot run in ``workers`` processes, as ``ConfigError`` problems."""
    if workers <= 1:
        return []
    kinds = {name: getattr(backend, "kind", None) for name, backend in config.backends.items()}
    return [
        (
            f"backends.{name}.kind",
            f"{kind} runs its model inside the gateway process, and {workers} workers cannot share "
            "one: serve it with 1 worker, or serve the model with llama-server, vLLM or Ollama and "
            "route to that",
        )
        for name, kind in kinds.items()
        if kind in IN_PROCESS_KINDS
    ]


def worker_settings(settings: Settings, index: int) -> Settings:
    """A worker's settings: a configured replica id gets the worker's index (each worker is a
    replica of its own in Redis: its heartbeats, leases and breaker votes)."""
    if settings.replica is None:
        return settings  # hostname-pid: already one per worker
    return settings.model_copy(update={"replica": f"{settings.replica}-{index}"})


@dataclass
class _Slot:
    index: int
    pid: int = 0
    started: float = 0.0
    #: replacements in a row that died young
    young_deaths: int = 0
    #: when a dead worker's replacement is due (monotonic); None while it runs
    due: float | None = None


@dataclass
class Supervisor:
    """Runs ``count`` workers, each ``run_worker(index)`` in a forked child (its return value the
    child's exit code), until stopped; ``run()`` returns the exit code for the whole gateway."""

    count: int
    run_worker: Callable[[int], int]
    clock: Callable[[], float] = time.monotonic
    slots: list[_Slot] = field(default_factory=list)
    stopping: bool = False
    exit_code: int = 0

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            self.slots = [_Slot(i) for i in range(self.count)]
            for slot in self.slots:
                self._start(slot)
            while any(slot.pid for slot in self.slots) or self._replacing():
                info = signal.sigtimedwait(HANDLED, self._wait_s())
                if info is not None:
                    self._on_signal(info.si_signo, info.si_pid)
                self._reap()
                self._replace_due()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        return self.exit_code

    # -- signals --------------------------------------------------------------------------------

    def _on_signal(self, signo: int, sender: int) -> None:
        if signo in (signal.SIGTERM, signal.SIGINT):
            if not self.stopping:
                log.info("stopping %d workers (%s)", self.count, signal.Signals(signo).name)
            self.stopping = True
            self._send(signal.SIGTERM)
        elif signo == signal.SIGHUP:
            self._send(signal.SIGHUP)
        elif signo == signal.SIGUSR1:
            self._send(signal.SIGHUP, skip=sender)

    def _send(self, signo: int, skip: int = 0) -> None:
        for slot in self.slots:
            if slot.pid and slot.pid != skip:
                try:
                    os.kill(slot.pid, signo)
                except ProcessLookupError:
                    pass  # died just now: reaped on the next turn

    # -- workers --------------------------------------------------------------------------------

    def _start(self, slot: _Slot) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the supervisor's loop
            code = 1
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
                code = self.run_worker(slot.index)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("worker %d failed", slot.index)
            finally:
                logging.shutdown()
                os._exit(code)
        slot.pid, slot.started, slot.due = pid, self.clock(), None
        log.info("worker %d started (pid %d)", slot.index, pid)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is not None:
                self._ended(slot, os.waitstatus_to_exitcode(status))

    def _ended(self, slot: _Slot, code: int) -> None:
        pid, slot.pid = slot.pid, 0
        if self.stopping:
            if code not in (0, -signal.SIGTERM):
                log.warning("worker %d ended with %s while stopping", slot.index, _how(code))
            return
        if code in START_FAILURES:
            log.error("worker %d could not start (exit %d): stopping the others", slot.index, code)
            self.stopping, self.exit_code = True, code
            self._send(signal.SIGTERM)
            return
        lived = self.clock() - slot.started
        slot.young_deaths = slot.young_deaths + 1 if lived < YOUNG_S else 0
        wait = min(BACKOFF_MAX_S, 0.5 * 2 ** (slot.young_deaths - 1)) if slot.young_deaths else 0.0
        slot.due = self.clock() + wait
        log.error(
            "worker %d (pid %d) ended with %s after %.1f s: replacing it in %.1f s",
            slot.index,
            pid,
            _how(code),
            lived,
            wait,
        )

    def _replacing(self) -> bool:
        return not self.stopping and any(slot.due is not None for slot in self.slots)

    def _replace_due(self) -> None:
        if self.stopping:
            return
        now = self.clock()
        for slot in self.slots:
            if slot.due is not None and slot.due <= now:
                self._start(slot)

    def _wait_s(self) -> float:
        due = [slot.due for slot in self.slots if slot.due is not None]
        if not due or self.stopping:
            return 1.0
        return max(0.01, min(1.0, min(due) - self.clock()))


def _how(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


def reload_siblings() -> None:
    """From a worker: ask the supervisor to reload the other workers (``POST /admin/reload``)."""
    os.kill(os.getppid(), signal.SIGUSR1)
