"""A GGUF model loaded once through llama.cpp: weights, vocabulary and metadata.

Both engines take one: ``backends.llamacpp.engine`` (generative models, continuous
batching) and ``backends.llamacpp.embed`` (embedding models). ``embedding`` tells them apart
from the GGUF itself: an embedding model declares how it pools its token vectors
(``<arch>.pooling_type``: mean, CLS, last, rank), a generative one does not.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

# llama_cpp must load before anything imports numpy (CUDA builds segfault otherwise).
import llama_cpp.llama_cpp as C
from llama_cpp import _logger as llama_logging

log = logging.getLogger("interlock.backends.llamacpp")

#: what ``Model.piece`` gives for an end-of-generation token
EOG = b"\x00<eog>"

FLASH_ATTN = {
    "auto": C.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": C.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": C.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


class Model:
    """Loads the GGUF (blocking: call it in a worker thread); ``free()`` releases it."""

    def __init__(self, path: str, *, n_gpu_layers: int) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model file not found: {path}")
        llama_logging.set_verbose(False)  # llama.cpp's load chatter goes to stderr otherwise
        C.llama_backend_init()
        started = time.perf_counter()
        params = C.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        # Big GGUFs take minutes to load; log each quarter so an operator sees it move.
        reported = [-1]

        def progress(fraction: float, _: Any) -> bool:
            quarter = int(fraction * 4)
            if quarter > reported[0]:
                reported[0] = quarter
                log.info("loading %s: %d%%", os.path.basename(path), quarter * 25)
            return True

        callback = C.llama_progress_callback(progress)  # must outlive the load call
        params.progress_callback = callback
        self.ptr = C.llama_model_load_from_file(path.encode(), params)
        if not self.ptr:
            raise RuntimeError(f"llama.cpp could not load {path}: not a valid GGUF model")
        self.path = path
        self.vocab = C.llama_model_get_vocab(self.ptr)
        self.n_vocab: int = C.llama_vocab_n_tokens(self.vocab)
        self.n_embd: int = C.llama_model_n_embd(self.ptr)
        self.architecture = self.meta("general.architecture") or "unknown"
        pooling = self.meta(f"{self.architecture}.pooling_type")
        #: declares a pooling of its token vectors: an embedding model, not a generative one
        self.embedding = pooling is not None and pooling.strip() not in ("", "0")
        self.chat_template = self.meta("tokenizer.chat_template")
        self.bos_id: int = C.llama_vocab_bos(self.vocab)
        self.bos_token = self._token_text(self.bos_id)
        self.eos_token = self._token_text(C.llama_vocab_eos(self.vocab))
        #: a text of n characters is at least n / this many tokens, which rejects a prompt far too
        #: long for the context before tokenizing it (0: no such bound). Only for tokenizers that
        #: keep every character (BPE, SentencePiece); WordPiece and Unigram drop whitespace.
        self.chars_per_token_max = (
            self._longest_token()
            if C.llama_vocab_type(self.vocab) in (C.LLAMA_VOCAB_TYPE_BPE, C.LLAMA_VOCAB_TYPE_SPM)
            else 0
        )
        #: token id → its bytes (or ``EOG``), filled by ``piece``
        self.pieces: dict[int, bytes] = {}
        self._piece = ctypes.create_string_buffer(256)
        self.load_seconds = time.perf_counter() - started

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        """Text to tokens. ``add_special``: the model's BOS/CLS and EOS/SEP around them, as it
        expects; ``parse_special``: special-token text (``<|im_start|>``) becomes the special
        token, not its characters: only for text that is all the caller's own, never for text
        of several parties (a chat: see ``tokenize_parts``)."""
        raw = text.encode()
        size = len(raw) + 8
        buf = (C.llama_token * size)()
        n = C.llama_tokenize(self.vocab, raw, len(raw), buf, size, add_special, parse_special)
        if n < 0:  # more tokens than bytes + 8 is impossible, but the API allows it
            buf = (C.llama_token * -n)()
            n = C.llama_tokenize(self.vocab, raw, len(raw), buf, -n, add_special, parse_special)
        return buf[:n]

    def tokenize_parts(self, parts: Sequence[tuple[str, bool]]) -> list[int]:
        """A rendered chat's tokens, from ``(text, is_template)`` parts: special-token text is
        parsed in the template's parts only, so a message's ``<|im_start|>`` stays characters."""
        tokens: list[int] = []
        for text, template in parts:
            if text:
                tokens += self.tokenize(text, add_special=False, parse_special=template)
        return tokens

    def piece(self, tok: int) -> bytes:
        """A token's bytes (or ``EOG``), asked of llama.cpp once per token id and then kept in
        ``pieces``: every foreign call is a chance to wait for the GIL behind the event loop.
        The engine thread's alone (one buffer, no lock)."""
        if C.llama_vocab_is_eog(self.vocab, tok):
            piece = EOG
        else:
            n = C.llama_token_to_piece(self.vocab, tok, self._piece, 256, 0, False)
            piece = self._piece.raw[:n] if n > 0 else b""
        self.pieces[tok] = piece
        return piece

    def meta(self, key: str) -> str | None:
        size = 1 << 16
        buf = ctypes.create_string_buffer(size)
        n = C.llama_model_meta_val_str(self.ptr, key.encode(), buf, size)
        if n < 0:
            return None
        if n >= size:
            buf = ctypes.create_string_buffer(n + 1)
            C.llama_model_meta_val_str(self.ptr, key.encode(), buf, n + 1)
        return buf.value.decode("utf-8", "replace")

    def free(self) -> None:
        if self.ptr:
            C.llama_model_free(self.ptr)
            self.ptr = None

    def min_tokens(self, text: str) -> int:
        """A lower bound on the tokens ``text`` makes (0 where the tokenizer gives none)."""
        return len(text) // self.chars_per_token_max if self.chars_per_token_max else 0

    def _longest_token(self) -> int:
        """The longest token's text, in bytes (a character is at least one byte)."""
        buf = ctypes.create_string_buffer(256)
        longest = 1
        for tok in range(self.n_vocab):
            n = C.llama_token_to_piece(self.vocab, tok, buf, 256, 0, True)
            longest = max(longest, n if n > 0 else -n)
        return longest

    def _token_text(self, tok: int) -> str:
        if tok < 0:
            return ""
        return (C.llama_vocab_get_text(self.vocab, tok) or b"").decode("utf-8", "replace")


__all__ = ["EOG", "FLASH_ATTN", "Model"]
