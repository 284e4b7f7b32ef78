"""Throw-away redis-server processes on loopback for the cache tests (a pause or a kill must not
stall the shared Redis on 6379, and a Cluster needs nodes of its own)."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import redis

from tests.fakes import free_port, wait_for

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def _cluster_port() -> int:
    """A free port whose cluster bus (the port + 10000) is free too, so at most 55535."""
    while True:
        port = free_port()
        if port > 55535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port


def _pings(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


class RedisServer:
    """One ``redis-server`` in ``workdir``; ``stop()`` then ``start()`` again keeps its port."""

    def __init__(self, workdir: Path, *, cluster: bool = False) -> None:
        self.port = _cluster_port() if cluster else free_port()
        self.workdir = workdir / str(self.port)
        self.workdir.mkdir(parents=True)
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        assert REDIS_SERVER, "redis-server is not installed"
        args = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.workdir),
        ]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.workdir / "nodes.conf")]
        proc = self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server on {self.port} exited with {proc.returncode}")
            return _pings(self.port)

        wait_for(up, what=f"redis-server on {self.port}")
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()  # as a crash would: no goodbye to the clients
            proc.wait(10)


def create_cluster(nodes: list[RedisServer]) -> None:
    """Join ``nodes`` into one Cluster (no replicas) and wait until every node says it is ok."""
    assert REDIS_CLI, "redis-cli is not installed"
    addresses = [f"127.0.0.1:{n.port}" for n in nodes]
    subprocess.run(
        [REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
    )

    def all_ok() -> bool:
        for n in nodes:
            info = subprocess.run(
                [REDIS_CLI, "-p", str(n.port), "cluster", "info"], capture_output=True, timeout=10
            ).stdout
            if b"cluster_state:ok" not in info:
                return False
        return True

    wait_for(all_ok, timeout=30, what="cluster_state:ok")
