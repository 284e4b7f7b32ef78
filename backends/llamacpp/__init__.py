"""``kind: llamacpp``: llama.cpp in this process, with continuous batching (``backend`` is the
backend, ``config`` its settings; ``engine`` the step loop, ``job`` one request in it; ``model``,
``kv``, ``seqs``, ``sampling``, ``text``, ``chat``, ``options`` its parts; ``embed`` the
embedding engine)."""

from backends.llamacpp.backend import LlamaCppBackend, ModelLoadError
from backends.llamacpp.config import DEFAULT_GGUF, LlamaCppConfig, default_model_path

__all__ = ["DEFAULT_GGUF", "LlamaCppBackend", "LlamaCppConfig", "ModelLoadError", "default_model_path"]
