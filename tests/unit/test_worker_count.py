"""server.workers "auto": the CPUs this process may use, bounded by a cgroup CPU quota, read
from real cgroup files written under a temporary root (cgroup v2's cpu.max, v1's
cpu.cfs_quota_us / cpu.cfs_period_us), and the setting as the config and `check` take it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from router.cli import main
from router.config import ServerConfig, config_schema, parse_config
from router.server.workercount import (
    AUTO_MAX_WORKERS,
    MAX_WORKERS,
    WorkerCount,
    auto_count,
    cgroup_cpu_quota,
    resolve_workers,
    usable_cpus,
)

AFFINITY = len(os.sched_getaffinity(0))
TARGET = {"id": "archive", "target_type": "file", "file_endpoint": {"path": "/tmp/a.ndjson"}}


def cgroups(tmp_path: Path, lines: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup root holding `files` (relative path -> content) and a /proc/self/cgroup."""
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="ascii")
    proc = tmp_path / "self-cgroup"
    proc.write_text(lines, encoding="ascii")
    return root, proc


@pytest.mark.parametrize(
    ("lines", "files", "cpus"),
    [
        pytest.param("0::/\n", {"cpu.max": "200000 100000\n"}, 2, id="v2-two-cpus"),
        pytest.param("0::/\n", {"cpu.max": "150000 100000\n"}, 2, id="v2-rounded-up"),
        pytest.param("0::/\n", {"cpu.max": "20000 100000\n"}, 1, id="v2-a-fraction-is-one"),
        pytest.param("0::/\n", {"cpu.max": "max 100000\n"}, None, id="v2-max-is-no-quota"),
        pytest.param("0::/\n", {}, None, id="v2-no-file"),
        pytest.param("0::/\n", {"cpu.max": "lots\n"}, None, id="v2-garbage-is-ignored"),
        pytest.param(
            "0::/kubepods/pod1/box\n",
            {"kubepods/cpu.max": "300000 100000\n", "kubepods/pod1/box/cpu.max": "max 100000\n"},
            3,
            id="v2-an-ancestor-bounds-it",
        ),
        pytest.param(
            "0::/kubepods/pod1/box\n",
            {"kubepods/cpu.max": "800000 100000\n", "kubepods/pod1/box/cpu.max": "400000 100000"},
            4,
            id="v2-the-tightest-wins",
        ),
        pytest.param(
            "0::/docker/abc\n",  # a path from outside the container's cgroup namespace
            {"cpu.max": "200000 100000\n"},
            2,
            id="v2-own-path-not-under-the-mount",
        ),
        pytest.param(
            "4:cpu,cpuacct:/\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "250000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            3,
            id="v1-cpu-cpuacct",
        ),
        pytest.param(
            "1:cpu:/\n",
            {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
            None,
            id="v1-minus-one-is-no-quota",
        ),
        pytest.param(
            "3:cpuset:/\n1:cpu:/docker/abc\n",
            {
                "cpu/cpu.cfs_quota_us": "-1\n",
                "cpu/cpu.cfs_period_us": "100000\n",
                "cpu/docker/abc/cpu.cfs_quota_us": "100000\n",
                "cpu/docker/abc/cpu.cfs_period_us": "100000\n",
            },
            1,
            id="v1-own-cgroup",
        ),
    ],
)
def test_a_cgroup_quota_is_the_cpus_worth_of_time_it_allows(
    tmp_path: Path, lines: str, files: dict[str, str], cpus: int | None
) -> None:
    root, proc = cgroups(tmp_path, lines, files)
    quota = cgroup_cpu_quota(root, proc)
    if cpus is None:
        assert quota is None
    else:
        assert quota is not None
        assert quota[0] == cpus
        assert str(root) in quota[1]


def test_without_a_quota_auto_is_the_cpus_of_this_process_affinity(tmp_path: Path) -> None:
    root, proc = cgroups(tmp_path, "0::/\n", {"cpu.max": "max 100000\n"})
    count = resolve_workers("auto", cgroup_root=root, proc_cgroup=proc)
    assert count == WorkerCount("auto", min(AFFINITY, AUTO_MAX_WORKERS), count.basis)
    assert "affinity" in count.basis


def test_a_quota_of_one_cpu_makes_auto_one_process(tmp_path: Path) -> None:
    """A container given one CPU's time on a bigger host: one process, today's workers: 1."""
    root, proc = cgroups(tmp_path, "0::/\n", {"cpu.max": "100000 100000\n"})
    count = resolve_workers("auto", cgroup_root=root, proc_cgroup=proc)
    assert count.count == 1
    assert "cpu.max" in count.basis
    assert count.describe().endswith(": one process")
    assert count.status() == {"setting": "auto", "configured": 1, "basis": count.basis}


def test_a_quota_above_the_affinity_does_not_raise_the_count(tmp_path: Path) -> None:
    root, proc = cgroups(tmp_path, "0::/\n", {"cpu.max": f"{(AFFINITY + 3) * 100000} 100000"})
    assert usable_cpus(cgroup_root=root, proc_cgroup=proc)[0] == AFFINITY


def test_this_machine_resolves_auto_to_at_least_one_process() -> None:
    """The real /sys/fs/cgroup and /proc/self/cgroup, whatever they hold."""
    count = resolve_workers("auto")
    assert 1 <= count.count <= min(AFFINITY, AUTO_MAX_WORKERS)


@pytest.mark.parametrize(
    ("cpus", "workers"),
    [(1, 1), (2, 2), (AUTO_MAX_WORKERS, AUTO_MAX_WORKERS), (96, AUTO_MAX_WORKERS)],
)
def test_auto_stops_at_what_one_journal_owner_can_take(cpus: int, workers: int) -> None:
    """A 96-CPU host does not get 96 workers (about 4.6 GB busy) for one journal owner that
    two of them already outrun; a number set in the config still goes up to MAX_WORKERS."""
    count = auto_count(cpus, f"{cpus} CPUs in this process's affinity")
    assert count.count == workers
    assert count.basis.startswith(f"{cpus} CPUs")
    assert (f"at most {AUTO_MAX_WORKERS}" in count.basis) == (cpus > AUTO_MAX_WORKERS)
    assert resolve_workers(MAX_WORKERS).count == MAX_WORKERS


def test_a_number_is_itself_whatever_the_cpus(tmp_path: Path) -> None:
    root, proc = cgroups(tmp_path, "0::/\n", {"cpu.max": "100000 100000\n"})
    count = resolve_workers(3, cgroup_root=root, proc_cgroup=proc)
    assert count == WorkerCount(3, 3, "server.workers")
    assert count.describe() == "server.workers: 3"


def test_the_default_is_auto() -> None:
    assert ServerConfig().workers == "auto"
    assert parse_config({"targets": [TARGET]}).server.workers == "auto"


def test_the_schema_bounds_a_number_as_auto_is_bounded() -> None:
    workers = config_schema()["properties"]["server"]["properties"]["workers"]
    assert workers["maximum"] == MAX_WORKERS


@pytest.mark.parametrize("value", ["auto", 1, 2, MAX_WORKERS])
def test_auto_and_a_number_of_processes_are_taken(value: int | str) -> None:
    assert parse_config({"server": {"workers": value}}).server.workers == value


@pytest.mark.parametrize("value", [0, -1, MAX_WORKERS + 1, "two", "AUTO", 1.5, True, None])
def test_anything_else_is_refused_at_its_path(value: object) -> None:
    from router.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config({"server": {"workers": value}})
    assert [p for p in info.value.problems if p.startswith("server.workers: ")], info.value.problems


def test_check_says_auto_and_its_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"targets": [TARGET]}), encoding="utf-8")
    main(["check", "--config", str(path)])
    out = capsys.readouterr().out.splitlines()
    assert out[1] == resolve_workers("auto").describe()
    assert out[1].startswith("server.workers: auto = ")


def test_check_says_a_number_as_it_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"targets": [TARGET], "server": {"workers": 1}}), "utf-8")
    main(["check", "--config", str(path)])
    assert capsys.readouterr().out.splitlines()[1] == "server.workers: 1: one process"
