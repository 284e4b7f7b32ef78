"""``interlock bench`` and ``interlock mock-upstream``: a load generator for any OpenAI-compatible
endpoint, and a server to point it at when there is no GPU.

Off the serving path: nothing under ``gateway/`` imports this package except the CLI, and only
when one of these two commands runs.

- ``workload``: what to send (lengths, shared prefixes, sessions, repeats, trace replay)
- ``client``: one request on the wire, measured (TTFT, inter-token times, errors by class)
- ``runner``: closed and open loop, workers, the tool's own CPU
- ``report``: figures in the keys of ``vllm bench serve``, the table, JSON and JSONL
- ``plot``: per-user tokens/s and TTFT against concurrency or rate
- ``mock``: the OpenAI-compatible mock upstream with faults
- ``cli``: the two commands' flags
"""
