"""``kind: ollama``: an Ollama server through its native API (``backend``; ``translate`` the
OpenAI ↔ Ollama shapes; ``stream`` the NDJSON-to-SSE relay)."""

from backends.ollama.backend import OllamaBackend, OllamaConfig, normalise_model_name

__all__ = ["OllamaBackend", "OllamaConfig", "normalise_model_name"]
