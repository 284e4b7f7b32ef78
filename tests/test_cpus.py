"""backends.cpus: the CPU count the llama.cpp engine defaults to, from fake cgroup trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backends.cpus import available_cpus

AFFINITY = len(os.sched_getaffinity(0))


def tree(root: Path, files: dict[str, str], cgroup: str = "0::/\n") -> tuple[Path, Path]:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = root.parent / "proc-self-cgroup"
    proc.write_text(cgroup)
    return root, proc


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "cg").mkdir()
    return tmp_path / "cg"


@pytest.fixture
def many_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64-CPU affinity mask, so that the quota is what decides."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)))


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("200000 100000\n", 2),
        ("150000 100000\n", 1),  # 1.5 CPUs: rounded down
        ("50000 100000\n", 1),  # under one CPU: still one thread
        ("max 100000\n", 64),  # no limit: the affinity decides
        ("garbage\n", 64),
    ],
)
def test_cgroup_v2_cpu_max(root: Path, many_cpus: None, cpu_max: str, expected: int) -> None:
    assert available_cpus(*tree(root, {"cpu.max": cpu_max})) == expected


def test_cgroup_v2_limit_on_a_parent_applies(root: Path, many_cpus: None) -> None:
    files = {
        "cpu.max": "max 100000",
        "app.slice/cpu.max": "300000 100000",
        "app.slice/gw.service/cpu.max": "max 100000",
    }
    assert available_cpus(*tree(root, files, "0::/app.slice/gw.service\n")) == 3


@pytest.mark.parametrize(("quota", "expected"), [("400000", 4), ("-1", 64)])
@pytest.mark.parametrize("controller", ["cpu", "cpu,cpuacct"])
def test_cgroup_v1_cfs_quota(root: Path, many_cpus: None, controller: str, quota: str, expected: int) -> None:
    files = {f"{controller}/cpu.cfs_quota_us": quota + "\n", f"{controller}/cpu.cfs_period_us": "100000\n"}
    assert available_cpus(*tree(root, files)) == expected


def test_affinity_below_the_quota_wins(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    assert available_cpus(*tree(root, {"cpu.max": "800000 100000"})) == 2


def test_no_cgroup_files_is_the_affinity(tmp_path: Path) -> None:
    assert available_cpus(tmp_path / "absent", tmp_path / "absent-too") == AFFINITY


def test_this_machine() -> None:
    assert 1 <= available_cpus() <= AFFINITY
