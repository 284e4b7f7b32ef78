"""Continuous batching over one llama.cpp context, driven by one thread.

The engine thread owns the model and the context. Each step it builds one batch
holding the next token of every generating sequence plus prefill chunks of newly
admitted prompts, runs a single ``llama_decode``, and samples every sequence from
that step's logits at once (``backends.llamacpp.sampling``). Requests join between
steps; a finished or cancelled sequence keeps its KV cells and its seq id goes back
to the free list.

Prefill: a step takes at most ``prefill_chunk`` prompt tokens (oldest prompt first;
a tail under half a chunk is taken with the rest), so a burst of new prompts pauses
running streams for one short step at a time, and the first prompts of the burst
start answering before the last ones are read.

Follow-ups: a client that sends its next request the moment a reply ends (an agent loop, a
benchmark's closed loop) would miss the step that starts right after that reply's last token
and wait a whole step before its prompt is read; when another user's prompt filled that step,
the two users' replies then end one step apart, and each one's follow-up waits behind the
other's prefill again, every turn. After a step that ended a reply, with no request waiting,
the engine therefore waits up to ``follow_up_wait_ms`` for one (any arrival ends the wait).

Prefix reuse: a free sequence keeps its KV cells, and a new request takes the one
sharing the longest prefix with its prompt, or has a longer prefix another sequence holds
copied (``llama_memory_seq_cp``); only the rest is prefilled (``backends.llamacpp.seqs``
chooses, ``backends.llamacpp.kv`` does it). At least one prompt token is always decoded,
for its logits. A failed decode clears the KV.

Context sharing: the context has ``n_ctx`` KV cells and ``n_seq_max = parallel``,
and every request may use at most ``n_ctx // parallel`` of them, prompt and reply
together. At most ``parallel`` run at once, so the cells can never run out halfway
through a reply, and admission is a simple length check. With one KV stream per
sequence (``kv_unified = False``, the CPU default), llama.cpp cuts a batch into
micro-batches of consecutive, increasing seq ids, each a full pass over the
weights: so the batch is ordered by seq id, and a new request prefers a seq next
to running ones. Separate streams keep a sequence's numerics independent of its
neighbours, so greedy output does not depend on what else is running. On a GPU the
cache is one unified stream: a copied prefix is shared, not copied.

Threads: ``submit``/``cancel`` run on the event loop and only touch lock-guarded
containers and an Event; the engine answers through ``loop.call_soon_threadsafe``,
once per step for all sequences, so the loop wakes once per step, not per token.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import sys
import threading
from collections import deque
from typing import Any

# llama_cpp must load before anything imports numpy (CUDA builds segfault otherwise).
import llama_cpp.llama_cpp as C
import numpy as np

from backends.cpus import available_cpus
from backends.llamacpp.job import Failed, Finished, Job
from backends.llamacpp.kv import KvCells
from backends.llamacpp.model import EOG, FLASH_ATTN, Model
from backends.llamacpp.sampling import Sampling, sample_rows

log = logging.getLogger("interlock.backends.llamacpp")


class Engine:
    """Runs the batching thread over a context of ``model`` (which it frees on ``close``).
    Blocking to create: call it in a worker thread."""

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int,
        n_threads: int | None,
        n_batch: int,
        parallel: int,
        max_queue: int,
        flash_attn: str = "auto",
        kv_unified: bool = False,
        prefill_chunk: int | None = None,
        follow_up_wait_ms: float = 0.0,
    ) -> None:
        threads = n_threads or available_cpus()  # a container's CPU quota, not the host's cores
        self.model = model
        cparams = C.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = parallel
        cparams.kv_unified = kv_unified
        cparams.flash_attn_type = FLASH_ATTN[flash_attn]
        cparams.n_threads = cparams.n_threads_batch = threads
        self._ctx = C.llama_init_from_model(model.ptr, cparams)
        if not self._ctx:
            raise RuntimeError(
                f"llama.cpp could not create a context for {model.path} (n_ctx={n_ctx}, parallel={parallel})"
            )
        mem = C.llama_get_memory(self._ctx)
        if not mem:  # e.g. a BERT without pooling metadata: it cannot generate
            C.llama_free(self._ctx)
            raise RuntimeError(
                f"{model.path} ({model.architecture}) keeps no KV cache: it is not a generative model"
            )
        self._n_vocab = model.n_vocab
        self.n_ctx: int = C.llama_n_ctx(self._ctx)
        self.n_ctx_seq: int = self.n_ctx // parallel
        self.parallel = parallel
        self.max_queue = max_queue
        self._n_batch = n_batch
        self._prefill_chunk = min(prefill_chunk or n_batch, n_batch)
        self._follow_up_wait_s = follow_up_wait_ms / 1000
        #: a reply ended (or was cancelled) since the last follow-up wait
        self._freed = False
        #: llama_decode calls so far
        self.steps = 0
        self._batch = C.llama_batch_init(n_batch, 0, 1)
        # Every batch row belongs to exactly one sequence; set once, not per step.
        for i in range(n_batch):
            self._batch.n_seq_id[i] = 1
        self._seq_slots = [self._batch.seq_id[i] for i in range(n_batch)]
        self._pieces = model.pieces
        # The engine thread re-takes the GIL after every llama.cpp call; with the default 5 ms
        # switch interval it can wait that long behind the event loop each time, which capped a
        # GPU at a few hundred tokens/s whatever the batch. 0.5 ms keeps the wait small.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))

        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._waiting: deque[Job] = deque()
        self._cancelled: list[Job] = []
        self._active: list[Job] = []
        self._kv = KvCells(mem, parallel, unified=kv_unified)
        self._admitted = 0
        self._stopping = False
        self.error: str | None = None  # set if the engine thread died
        self._thread = threading.Thread(target=self._run, name="llamacpp-engine", daemon=True)
        self._thread.start()

    # ---- event-loop side -------------------------------------------------------------

    @property
    def n_active(self) -> int:
        return len(self._active)

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens taken from the KV cache instead of prefilled, over all requests."""
        return self._kv.reused_tokens

    @property
    def copied_tokens(self) -> int:
        """Of ``reused_tokens``, those copied from another sequence's cells."""
        return self._kv.copied_tokens

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, tokens: list[int], sampling: Sampling, queue: asyncio.Queue[Any]) -> Job | None:
        """Queue a prompt (already checked to fit ``n_ctx_seq``); None when the queue is full.

        ``queue`` then receives ``str`` text deltas and one ``Finished`` or ``Failed``.
        """
        room = self.n_ctx_seq - len(tokens)
        max_new = room if sampling.max_tokens is None else min(sampling.max_tokens, room)
        job = Job(tokens, sampling, queue, asyncio.get_running_loop(), max_new)
        with self._lock:
            if self._stopping:  # the thread is gone or going: answer at once, never hang
                queue.put_nowait(Failed(self.error or "the llamacpp engine stopped"))
                return job
            # Cancelled jobs still hold their sequence until the next step; they do not count.
            held = len(self._waiting) + len(self._active) - len(self._cancelled)
            if held >= self.parallel + self.max_queue:
                return None
            self._waiting.append(job)
        self._wake.set()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a job whose consumer went away; its KV cells are freed before the next step."""
        with self._lock:
            self._cancelled.append(job)
        self._wake.set()

    def close(self) -> None:
        """Stop the thread (finishing the current step) and free the context and model."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._fail_all("the llamacpp backend was closed")
        C.llama_batch_free(self._batch)
        C.llama_free(self._ctx)
        self.model.free()

    # ---- engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._admit()
                if not self._active:
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self._step()
                if self._freed:
                    self._freed = False
                    self._await_follow_up()
        except BaseException as exc:  # a bug: fail loudly and never leave a client hanging
            self.error = f"engine thread died: {exc!r}"
            log.exception("llamacpp %s: %s; every request fails until a restart", self.model.path, self.error)
            with self._lock:  # a submit from here on is answered at once (see submit)
                self._stopping = True
            self._fail_all(self.error, release=False)  # the crash may have left the KV bookkeeping bad

    def _await_follow_up(self) -> None:
        """Give a client whose reply just ended the chance to have its next prompt in the next step
        (see the module's docstring). With nothing running the loop sleeps until a submit anyway."""
        if self._follow_up_wait_s <= 0 or not self._active:
            return
        self._wake.clear()  # before looking: a submit from here on sets it again
        if self._waiting or self._cancelled or self._stopping:
            return
        self._wake.wait(self._follow_up_wait_s)

    def _admit(self) -> None:
        """Apply cancellations, then move waiting jobs into free sequences."""
        if not (self._cancelled or (self._waiting and self._kv.has_free)):
            return
        with self._lock:
            cancelled, self._cancelled = self._cancelled, []
            for job in cancelled:
                if job.seq >= 0:
                    self._release(job)
                elif job in self._waiting:
                    self._waiting.remove(job)
            while self._waiting and self._kv.has_free:
                job = self._waiting.popleft()
                self._admitted += 1
                job.admitted = self._admitted
                self._take_seq(job)
                # Ordered by seq id: with one KV stream per sequence, llama.cpp cuts a batch into
                # micro-batches of consecutive, increasing seq ids, each a full pass over the weights.
                bisect.insort(self._active, job, key=_seq_of)

    def _take_seq(self, job: Job) -> None:
        """Give ``job`` a free seq, skipping the prompt prefix already in the KV cache: the seq's
        own, or a longer one copied from another sequence (``KvCells`` and ``SeqTable``)."""
        running = {j.seq: (j.tokens, j.n_fed) for j in self._active}
        job.seq, reused = self._kv.take(job.tokens, running)
        job.n_fed = job.pos = job.reused = reused

    def _step(self) -> None:
        batch, slots = self._batch, self._seq_slots
        token, pos, logits = batch.token, batch.pos, batch.logits
        n = 0
        # the jobs whose row of this batch outputs logits, in batch order (llama_get_logits' order)
        sample: list[Job] = []
        prefilling: list[Job] = []
        for job in self._active:  # decode first: a running stream never waits for a prompt
            if job.n_fed < len(job.tokens):
                prefilling.append(job)
                continue
            token[n] = job.next_token
            pos[n] = job.pos
            slots[n][0] = job.seq
            logits[n] = 1
            sample.append(job)
            job.pos += 1
            n += 1
        room, budget, chunk = self._n_batch - n, self._prefill_chunk, self._prefill_chunk
        prefilling.sort(key=_admission)  # oldest first
        for job in prefilling:
            left = len(job.tokens) - job.n_fed
            # a tail under half a chunk goes now, rather than make its user wait another step
            take = min(left if left <= budget + chunk // 2 else budget, room)
            if take <= 0:
                break
            seq, start = job.seq, job.n_fed
            for i, tok in enumerate(job.tokens[start : start + take], start):
                token[n] = tok
                pos[n] = i
                slots[n][0] = seq
                logits[n] = 0
                n += 1
            job.n_fed += take
            budget -= take
            room -= take
            if job.n_fed == len(job.tokens):
                logits[n - 1] = 1
                job.pos = job.n_fed
                sample.append(job)
        batch.n_tokens = n
        rc = C.llama_decode(self._ctx, batch)
        self.steps += 1
        if rc != 0:  # the KV state of every sequence in the batch is now unknown: drop them all
            log.error("llama_decode returned %d for a batch of %d tokens", rc, n)
            self._fail_all(f"llama_decode failed (code {rc})")
            return
        if not sample:  # only prompt chunks that do not end their prompt: no logits this step
            return
        # One foreign call for every row's logits, in batch order (llama.cpp restores that order);
        # the engine's own buffer, read before the next decode overwrites it.
        logits = np.ctypeslib.as_array(C.llama_get_logits(self._ctx), shape=(len(sample), self._n_vocab))
        tokens = sample_rows(logits, [job.sampler for job in sample])
        out: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]] = {}
        for job, tok in zip(sample, tokens, strict=True):
            self._accept(job, tok, out)
        self._deliver(out)

    def _accept(self, job: Job, tok: int, out: dict[Any, list[tuple[Any, Any]]]) -> None:
        job.n_gen += 1
        job.generated.append(tok)
        piece = self._pieces.get(tok)
        if piece is None:
            piece = self.model.piece(tok)
        if piece is EOG:
            self._finish(job, "stop", out)
            return
        text, stopped = job.text.add(piece)
        if text:
            out.setdefault(job.loop, []).append((job.queue, text))
        if stopped:
            self._finish(job, "stop", out, flush=False)
            return
        if job.n_gen >= job.max_new:
            self._finish(job, "length", out)
        else:
            job.next_token = tok

    def _finish(
        self, job: Job, reason: str, out: dict[Any, list[tuple[Any, Any]]], *, flush: bool = True
    ) -> None:
        """Report the end of a job and free its sequence; ``flush=False`` after a stop string."""
        if flush:  # a partial stop string or split character that never completed is real text
            tail = job.text.flush()
            if tail:
                out.setdefault(job.loop, []).append((job.queue, tail))
        out.setdefault(job.loop, []).append((job.queue, Finished(reason, len(job.tokens), job.n_gen)))
        self._release(job)

    def _fail_all(self, message: str, *, release: bool = True) -> None:
        out: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]] = {}
        with self._lock:
            for job in list(self._active):
                if release:
                    self._release(job, keep=False)
                out.setdefault(job.loop, []).append((job.queue, Failed(message)))
            if not release:
                self._active.clear()
            for job in self._waiting:
                out.setdefault(job.loop, []).append((job.queue, Failed(message)))
            self._waiting.clear()
        self._deliver(out)

    def _release(self, job: Job, *, keep: bool = True) -> None:
        """Free the job's seq. ``keep``: the last decode succeeded, so its KV cells hold exactly
        the prompt tokens fed and the generated tokens decoded; they stay for the next prompt."""
        kept: list[int] | None = None
        if keep:
            n_prompt = len(job.tokens)
            if job.n_fed < n_prompt:  # still prefilling (cancelled)
                kept = job.tokens[: job.n_fed]
            else:  # job.pos: positions decoded; the last sampled token was never decoded
                kept = job.tokens + job.generated[: job.pos - n_prompt]
        self._active.remove(job)
        self._kv.release(job.seq, kept)
        self._freed = True
        job.seq = -1

    @staticmethod
    def _deliver(out: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]]) -> None:
        for loop, items in out.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed; nobody is listening any more
                pass


def _seq_of(job: Job) -> int:
    return job.seq


def _admission(job: Job) -> int:
    return job.admitted


def _put_all(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


__all__ = ["Engine", "Failed", "Finished", "Job", "Sampling"]
