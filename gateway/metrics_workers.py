"""``/metrics`` with several workers: every worker's counts in whichever worker is scraped.

Each worker serves its own exposition on a unix socket in the supervisor's private directory
(``<dir>/<index>.sock``: connect, read to the end). A scrape reads the others' concurrently (a
worker that does not answer within ``timeout_s``, one being replaced say, is left out, and
``interlock_workers`` says how many answered) and adds them up sample by sample: counters and
histograms are summed, so each request is counted once, by the worker that served it. Gauges are
state, combined by what they mean: loads add up (in-flight, queued, memory), health is the worst
worker's (``MIN_GAUGES``), and the rest (breaker states, hashes, timestamps, ratios) the highest:
an open breaker in any worker shows as open. ``interlock_worker_requests_total{worker}`` keeps the
per-worker split of requests, to see how the kernel spread connections.

Counts live in the worker's memory, as in a single process: a worker replaced after a crash
starts from zero, which Prometheus reads as a counter reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

log = logging.getLogger("interlock.metrics")

SUM_GAUGES = frozenset(
    {
        "interlock_backend_in_flight",
        "interlock_backend_queued",
        "interlock_vllm_endpoint_in_flight",
        "interlock_vllm_endpoint_outstanding_tokens",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
    }
)
MIN_GAUGES = frozenset(
    {"interlock_redis_up", "interlock_vllm_endpoint_healthy", "process_start_time_seconds"}
)
_REQUESTS = "interlock_requests_total"


class WorkerMetrics:
    """One worker's side: serves ``local()`` to the others, and gathers theirs for a scrape."""

    def __init__(self, directory: str, index: int, count: int, *, timeout_s: float = 1.0) -> None:
        self.directory = Path(directory)
        self.index = index
        self.count = count
        self.timeout_s = timeout_s
        #: this worker's own exposition (``Metrics``' registry, set when the app is built)
        self.local: Callable[[], bytes] = lambda: b""
        self._server: asyncio.AbstractServer | None = None

    def _path(self, index: int) -> str:
        return str(self.directory / f"{index}.sock")

    async def start(self) -> None:
        async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(self.local())
                await writer.drain()
            except Exception:  # the asking worker left, or the exposition failed: its scrape says so
                log.debug("worker %d: answering a sibling's scrape failed", self.index, exc_info=True)
            finally:
                writer.close()

        path = self._path(self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a crashed predecessor's
        self._server = await asyncio.start_unix_server(answer, path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(self.index))

    async def _read(self, index: int) -> bytes | None:
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await asyncio.open_unix_connection(self._path(index))
                try:
                    return await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return None

    async def exposition(self, local: bytes) -> bytes:
        """Every answering worker's exposition, ``local`` (this worker's) included, merged."""
        others = [i for i in range(self.count) if i != self.index]
        read = await asyncio.gather(*(self._read(i) for i in others))
        texts = {self.index: local.decode()}
        texts.update({i: body.decode() for i, body in zip(others, read, strict=True) if body})
        return merge(texts)


def merge(texts: dict[int, str]) -> bytes:
    """The expositions of several workers (worker index → text) as one, added up."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    per_worker: dict[int, float] = {}
    for worker, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            kept = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            combined = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if sample.name == _REQUESTS:
                    per_worker[worker] = per_worker.get(worker, 0.0) + sample.value
                found = combined.get(key)
                combined[key] = sample.value if found is None else _combine(kept, found, sample.value)
    for name, family in families.items():
        family.samples = [Sample(s, dict(labels), value) for (s, labels), value in values[name].items()]
    workers = Metric("interlock_workers", "Gateway worker processes whose figures this scrape holds", "gauge")
    workers.samples = [Sample("interlock_workers", {}, float(len(texts)))]
    split = Metric(
        "interlock_worker_requests", "Inference requests by the worker that served them", "counter"
    )
    split.samples = [
        Sample("interlock_worker_requests_total", {"worker": str(i)}, per_worker.get(i, 0.0))
        for i in sorted(texts)
    ]
    registry = CollectorRegistry()
    registry.register(_Fixed([*families.values(), workers, split]))
    return generate_latest(registry)


def _combine(family: Metric, old: float, new: float) -> float:
    if family.type != "gauge" or family.name in SUM_GAUGES:
        return old + new
    return min(old, new) if family.name in MIN_GAUGES else max(old, new)


class _Fixed:
    def __init__(self, metrics: Iterable[Metric]) -> None:
        self._metrics = list(metrics)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._metrics
