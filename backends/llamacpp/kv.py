"""The KV cells of a generating llama.cpp context, sequence by sequence.

``backends.llamacpp.seqs`` decides, without touching llama.cpp, which free sequence a prompt
takes and which prefix it reuses; ``KvCells`` carries that out on the context's memory (drop
what does not match, copy a longer prefix from another sequence) and takes back what a
finished sequence leaves. The engine thread alone calls it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import llama_cpp.llama_cpp as C

from backends.llamacpp.seqs import SeqTable

log = logging.getLogger("interlock.backends.llamacpp")


class KvCells:
    def __init__(self, mem: Any, parallel: int, *, unified: bool) -> None:
        self._mem = mem
        self._unified = unified
        self._seqs = SeqTable(parallel, unified_kv=unified)
        #: prompt tokens taken from the KV cache instead of prefilled, over all requests
        self.reused_tokens = 0
        #: of which copied from another sequence's cells
        self.copied_tokens = 0

    @property
    def has_free(self) -> bool:
        return self._seqs.has_free

    def take(self, tokens: list[int], running: Mapping[int, tuple[list[int], int]]) -> tuple[int, int]:
        """A free seq for the prompt ``tokens`` and how many of them its cells now hold.
        ``running``: per running seq, its prompt and how much of it is in its cells."""

        def held(seq: int) -> list[int]:
            if seq in running:
                prompt, fed = running[seq]
                return prompt[:fed]
            return self._seqs.resident(seq)

        plan = self._seqs.take(tokens, running, held)
        seq, p = plan.seq, plan.own
        if plan.donor >= 0 and self._copy_prefix(plan.donor, seq, plan.donor_len):
            p = plan.donor_len
            self.copied_tokens += p
        else:
            if p < plan.cells and not C.llama_memory_seq_rm(self._mem, seq, p, -1):
                p = 0  # this memory cannot drop part of a sequence (e.g. recurrent state)
            if p == 0:
                C.llama_memory_seq_rm(self._mem, seq, -1, -1)
        if p and C.llama_memory_seq_pos_max(self._mem, seq) != p - 1:  # never expected: be safe
            log.warning(
                "seq %d: KV holds up to position %d, expected %d; clearing it",
                seq,
                C.llama_memory_seq_pos_max(self._mem, seq),
                p - 1,
            )
            C.llama_memory_seq_rm(self._mem, seq, -1, -1)
            p = 0
        self.reused_tokens += p
        log.debug("seq %d: reusing %d of %d prompt tokens from the KV cache", seq, p, len(tokens))
        return seq, p

    def release(self, seq: int, kept: list[int] | None) -> None:
        """Free ``seq``; ``kept``: the tokens its cells hold exactly, which stay for the next
        prompt; None when that is unknown (a failed decode), and the cells are cleared."""
        if kept is None:
            C.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self._seqs.release(seq, kept or [])

    def _copy_prefix(self, src: int, dst: int, n: int) -> bool:
        """Make ``dst`` hold ``src``'s first ``n`` positions. In one KV stream the cells are only
        tagged with ``dst`` too; across streams llama.cpp copies the whole stream's buffer
        (before the next decode), and the part past ``n`` is dropped."""
        C.llama_memory_seq_rm(self._mem, dst, -1, -1)
        if self._unified:
            C.llama_memory_seq_cp(self._mem, src, dst, 0, n)
            return True
        C.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
        if C.llama_memory_seq_rm(self._mem, dst, n, -1):
            return True
        C.llama_memory_seq_rm(self._mem, dst, -1, -1)
        return False


__all__ = ["KvCells"]
