"""``kind: llamacpp``: llama.cpp in this process, with continuous batching (``backend`` is the
backend; ``engine`` the step loop; ``model``, ``kv``, ``seqs``, ``sampling``, ``text``, ``chat``,
``options`` its parts; ``embed`` the embedding engine)."""

from backends.llamacpp.backend import (
    DEFAULT_GGUF,
    LlamaCppBackend,
    LlamaCppConfig,
    ModelLoadError,
    default_model_path,
)

__all__ = ["DEFAULT_GGUF", "LlamaCppBackend", "LlamaCppConfig", "ModelLoadError", "default_model_path"]
