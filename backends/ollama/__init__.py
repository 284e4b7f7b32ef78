"""``kind: ollama``: an Ollama server through its native API (``backend``; ``request`` and
``reply`` the OpenAI ↔ Ollama shapes; ``errors`` what its error replies mean; ``stream`` the
NDJSON-to-SSE relay; ``config`` the settings)."""

from backends.ollama.backend import OllamaBackend, normalise_model_name
from backends.ollama.config import OllamaConfig

__all__ = ["OllamaBackend", "OllamaConfig", "normalise_model_name"]
