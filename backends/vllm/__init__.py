"""``kind: vllm``: a pool of vLLM servers (``backend`` routes and serves; ``request`` the body
vLLM gets and what routing reads of it; ``affinity`` the prefix-locality rule; ``cost`` the TTFT
model; ``decisions`` the routing decisions kept; ``errors`` what vLLM's failures mean;
``members`` membership, checks and scrapes; ``endpoint`` one server's live state; ``metrics``
the /metrics parser; ``config`` the settings)."""

from backends.vllm.backend import VllmBackend
from backends.vllm.config import VllmConfig, endpoint_root

__all__ = ["VllmBackend", "VllmConfig", "endpoint_root"]
