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
import os
import shlex
import signal
import sys
from dataclasses import dataclass
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


@dataclass
class Launch:
    """How the benchmark starts one gateway: ``argv`` in ``checkout`` with ``env``."""

    name: str
    checkout: Path
    argv: list[str]
    env: dict[str, str]
    port: int
    #: where this script, run by ``argv``, writes the files of the modules it loaded
    record: Path

    def shown(self) -> str:
        env = " ".join(f"{k}={self.env[k]}" for k in ("PYTHONPATH", "INTERLOCK_SHUTDOWN_DELAY_S"))
        return f"cd {self.checkout} && {env} {shlex.join(self.argv)}"


def launch(name: str, checkout: Path, python: Path, cpu: str, config: Path, port: int, work: Path) -> Launch:
    """``interlock serve`` from ``checkout`` by ``python`` through this script, pinned to ``cpu``,
    with ``checkout`` as cwd and first on PYTHONPATH, and no 503 period on SIGTERM."""
    record = work / f"{name}-modules.json"
    argv = [
        "taskset",
        "-c",
        cpu,
        str(python),
        str(Path(__file__).resolve()),
        str(checkout),
        str(record),
        "serve",
        "--config",
        str(config),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    path = os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "INTERLOCK_SHUTDOWN_DELAY_S": "0"}
    return Launch(name, checkout, argv, env, port, record)


def check_loaded(record: Path, checkout: Path) -> int:
    """For the benchmark, after the process exited: the number of modules of PACKAGES in RECORD,
    which must all have come from ``checkout``; ValueError when one did not, or there is no record."""
    try:
        loaded: dict[str, list[str]] = json.loads(record.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"no record of the modules it loaded ({exc})") from None
    stray = {
        name: files
        for name, files in loaded.items()
        if not files
        or not all(Path(f).resolve().is_relative_to(checkout / name.partition(".")[0]) for f in files)
    }
    if stray or not {*PACKAGES} <= loaded.keys():
        raise ValueError(f"it did not run {checkout}'s code only: {stray or sorted(loaded)}")
    return len(loaded)


def _exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    checkout, record, args = Path(sys.argv[1]).resolve(), Path(sys.argv[2]), sys.argv[3:]
    sys.meta_path[:] = [
        f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")
    ]
    # In place of this script's directory, whose modules are the benchmark's, not the gateway's.
    sys.path[0] = str(checkout)
    atexit.register(lambda: record.write_text(json.dumps(loaded_files(), indent=1)))
    # uvicorn re-raises SIGTERM after its graceful shutdown, with the handler it found in place:
    # this one, so that the process exits through SystemExit and atexit, not the default action.
    signal.signal(signal.SIGTERM, _exit)
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
