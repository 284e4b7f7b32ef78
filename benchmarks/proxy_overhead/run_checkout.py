"""Runs ``interlock`` (``gateway.cli``) from the checkout CHECKOUT with the Python that runs this
script, and proves which code it ran: proxy_overhead.py starts both the gateway and the baseline
through it, with the one venv of the main checkout.

That venv holds an editable install of the main checkout: a meta-path finder (pip's
``__editable___interlock_*_finder``) mapping gateway, backends and policies to it. Put CHECKOUT
first on sys.path and the packages come from CHECKOUT, but the finder still answers for any
submodule CHECKOUT lacks (an older checkout has no ``gateway/serving.py``) with the main
checkout's file, so it is taken off ``sys.meta_path`` before the first import. Then the three
packages must come from CHECKOUT or the process exits, and at exit the files of every module of
theirs it loaded, lazy imports included, are written to RECORD (JSON) for the benchmark to check.

    python run_checkout.py CHECKOUT RECORD serve --config ... --port ...
"""

from __future__ import annotations

import atexit
import importlib
import json
import sys
from pathlib import Path

PACKAGES = ("gateway", "backends", "policies")


def loaded_files() -> dict[str, list[str]]:
    """Each loaded module of PACKAGES: its file, or a namespace package's directories."""
    out: dict[str, list[str]] = {}
    for name, module in list(sys.modules.items()):
        if name.partition(".")[0] in PACKAGES:
            file = getattr(module, "__file__", None)
            out[name] = [file] if file else [str(p) for p in getattr(module, "__path__", [])]
    return out


def main() -> None:
    checkout, record, args = Path(sys.argv[1]).resolve(), Path(sys.argv[2]), sys.argv[3:]
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not getattr(f, "__module__", "").startswith("__editable__")]
    # In place of this script's directory, whose modules are the benchmark's, not the gateway's.
    sys.path[0] = str(checkout)
    atexit.register(lambda: record.write_text(json.dumps(loaded_files(), indent=1)))
    for name in PACKAGES:
        file = Path(importlib.import_module(name).__file__ or "").resolve()
        if not file.is_relative_to(checkout / name):
            raise SystemExit(f"run_checkout: {name} was imported from {file}, not from {checkout}")
    print(f"run_checkout: {', '.join(PACKAGES)} from {checkout}", file=sys.stderr, flush=True)
    from gateway.cli import main as cli

    sys.argv = [sys.argv[0], *args]
    cli(args)


if __name__ == "__main__":
    main()
