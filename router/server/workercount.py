"""`server.workers` resolved to a number of processes: a number is itself, "auto" the CPUs this
process may use (its affinity, bounded by a cgroup CPU quota). Resolved once, when the daemon is
built (router/daemon.py); `check` and the start-up line say what it came to and why.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from router.observe.logformat import counted

# Explicit counts stop here (schemas/config.schema.json: server.workers' maximum).
MAX_WORKERS: Final = 64
# "auto" stops here, however many CPUs: every worker hands its events to the one journal owner,
# whose serial part (group commit, delivery, evidence: about 20 to 23 us of CPU per batched event
# on the 2-core development machine) one core runs at about 45,000 events/s, while a worker's
# intake (about 30 us per event) runs at about 33,000: two workers already outrun the owner, and
# past four a worker adds about 48 MB idle and 60 MB busy and no throughput. A number above it
# is the operator's to set.
AUTO_MAX_WORKERS: Final = 4
# Where cgroup file systems are mounted, and the file naming this process's cgroups.
CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP: Final = Path("/proc/self/cgroup")
# cgroup v1 mounts the cpu controller alone or with cpuacct, under either name.
CGROUP_V1_CPU_DIRS: Final = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


@dataclass(frozen=True, slots=True)
class WorkerCount:
    """`server.workers` resolved: the setting, the processes it means and why that many
    (`basis`, for /v1/status, the start-up line and `check`)."""

    setting: int | str
    count: int
    basis: str

    def status(self) -> dict[str, Any]:
        return {"setting": self.setting, "configured": self.count, "basis": self.basis}

    def describe(self) -> str:
        """`server.workers: auto = 2 (2 CPUs in this process's affinity)`, or `server.workers:
        2`, and `one process` where no worker process runs."""
        if self.setting == "auto":
            said = f"server.workers: auto = {self.count} ({self.basis})"
        else:
            said = f"server.workers: {self.count}"
        return said + (": one process" if self.count == 1 else "")


def resolve_workers(
    setting: int | str,
    *,
    cgroup_root: Path = CGROUP_ROOT,
    proc_cgroup: Path = PROC_SELF_CGROUP,
) -> WorkerCount:
    """`server.workers` as a number of processes: a number is itself; "auto" is the CPUs this
    process may use (usable_cpus), at most AUTO_MAX_WORKERS. Resolved once, when the daemon is
    built: a reload compares the setting, not this number."""
    if setting != "auto":
        return WorkerCount(setting, int(setting), "server.workers")
    return auto_count(*usable_cpus(cgroup_root=cgroup_root, proc_cgroup=proc_cgroup))


def auto_count(cpus: int, basis: str) -> WorkerCount:
    """ "auto" on `cpus` usable CPUs (`basis` says why that many)."""
    if cpus > AUTO_MAX_WORKERS:
        return WorkerCount("auto", AUTO_MAX_WORKERS, f"{basis}, at most {AUTO_MAX_WORKERS}")
    return WorkerCount("auto", cpus, basis)


def usable_cpus(
    *, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP
) -> tuple[int, str]:
    """The CPUs this process may run on (its affinity: a container's cpuset, `taskset`),
    bounded by a cgroup CPU quota where one is set (a container given 2 CPUs' worth of time
    on a 64-core host gets 2 workers, not 64); and what bounded it."""
    try:
        cpus = len(os.sched_getaffinity(0))
        basis = f"{counted(cpus, 'CPU')} in this process's affinity"
    except (AttributeError, OSError):  # no sched_getaffinity on this system
        cpus = os.cpu_count() or 1
        basis = f"{counted(cpus, 'CPU')} on this machine"
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None and quota[0] < cpus:
        return quota
    return cpus, basis


def cgroup_cpu_quota(root: Path, proc_cgroup: Path) -> tuple[int, str] | None:
    """The CPUs' worth of time a cgroup CPU quota allows this process (quota / period, rounded
    up), and the file that sets it; None without a quota. The tightest of this process's
    cgroup (as `proc_cgroup` names it) and its ancestors, under `root`: cgroup v2's cpu.max
    ("max" is no quota), v1's cpu.cfs_quota_us over cpu.cfs_period_us (-1 is none). In a
    container with its own cgroup namespace its cgroup is `root` itself."""
    v2_path, v1_path = _own_cgroups(proc_cgroup)
    found: list[tuple[int, str]] = []
    for directory in _ancestry(root, v2_path):
        if (limit := _cpu_max(directory / "cpu.max")) is not None:
            found.append(limit)
    for name in CGROUP_V1_CPU_DIRS:
        for directory in _ancestry(root / name, v1_path):
            if (limit := _cfs_quota(directory)) is not None:
                found.append(limit)
    return min(found, default=None)


def _own_cgroups(proc_cgroup: Path) -> tuple[str, str]:
    """This process's cgroup v2 path and its v1 cpu controller's ("/" where not named)."""
    v2 = v1 = "/"
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and not controllers:
            v2 = path or "/"
        elif "cpu" in controllers.split(","):
            v1 = path or "/"
    return v2, v1


def _ancestry(mount: Path, own: str) -> list[Path]:
    """The directories from `own`'s cgroup under `mount` up to `mount` itself (the ones that
    exist: a cgroup path from outside a container's namespace is not under its mount)."""
    directory = mount.joinpath(*(part for part in own.split("/") if part not in ("", ".", "..")))
    chain = [directory, *directory.parents]
    return [d for d in chain[: chain.index(mount) + 1] if d.is_dir()]


def _cpu_max(path: Path) -> tuple[int, str] | None:
    """cgroup v2: cpu.max is "QUOTA PERIOD" in microseconds, or "max PERIOD"."""
    try:
        quota, period = path.read_text(encoding="ascii").split()[:2]
        if quota == "max":
            return None
        return _cpus(int(quota), int(period), f"cgroup CPU quota {quota}/{period} in {path}")
    except (OSError, ValueError):
        return None


def _cfs_quota(directory: Path) -> tuple[int, str] | None:
    """cgroup v1: cpu.cfs_quota_us (-1: none) over cpu.cfs_period_us."""
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text(encoding="ascii"))
        period = int((directory / "cpu.cfs_period_us").read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None
    return _cpus(quota, period, f"cgroup CPU quota {quota}/{period} in {directory}")


def _cpus(quota: int, period: int, where: str) -> tuple[int, str] | None:
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period)), where
