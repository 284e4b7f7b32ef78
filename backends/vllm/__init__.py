"""``kind: vllm``: a pool of vLLM servers (``backend`` routes and serves; ``affinity`` is the
prefix-locality rule; ``members`` membership, checks and scrapes; ``endpoint`` one server's
live state; ``metrics`` the /metrics parser; ``config`` the settings)."""

from backends.vllm.backend import VllmBackend
from backends.vllm.config import VllmConfig, endpoint_root

__all__ = ["VllmBackend", "VllmConfig", "endpoint_root"]
