"""CPU, memory and process-count limits per emulated node: cgroup v1 (`cpu.cfs_quota_us`,
`memory.limit_in_bytes`, `pids.max` of the pids hierarchy) or v2 (`cpu.max`, `memory.max`,
`pids.max`), whichever the host has. The pids controller is optional (detected at run
time: `pids_controller` says which one limits the nodes, None when the host has none), so
that a device's fork bomb stops at its own limit instead of the host's.

Cgroup path: `testbed/<run>/<node>` under each hierarchy. `CgroupV2(root=tmpdir)` runs
against any directory, which is how the v2 logic is tested on a v1 host.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from testbed.errors import ResourceError

__all__ = [
    "CPU_PERIOD_US",
    "CgroupLimits",
    "Cgroups",
    "CgroupV1",
    "CgroupV2",
    "detect_cgroups",
    "cgroup_relpath",
    "rmdir_tree",
]

CPU_PERIOD_US = 100_000
SYS_CGROUP = Path("/sys/fs/cgroup")
TOP = "testbed"


@dataclass(frozen=True)
class CgroupLimits:
    cpu_cores: float | None
    memory_mb: int | None
    pids_max: int | None = None  # processes and threads together; None: no limit

    def quota_us(self) -> int | None:
        if self.cpu_cores is None:
            return None
        return max(1000, round(self.cpu_cores * CPU_PERIOD_US))


def cgroup_relpath(run_id: str, node_id: str | None = None) -> str:
    return f"{TOP}/{run_id}" + (f"/{node_id}" if node_id else "")


class Cgroups(Protocol):
    version: int
    pids_controller: str | None  # "cgroup v1 pids", "cgroup v2 pids" or None (pids_max is not enforced)

    def create(self, run_id: str, node_id: str, limits: CgroupLimits) -> list[Path]: ...
    def set_limits(self, run_id: str, node_id: str, limits: CgroupLimits) -> None: ...
    def read_limits(self, run_id: str, node_id: str) -> CgroupLimits: ...
    def procs_files(self, run_id: str, node_id: str) -> list[Path]: ...
    def pids(self, run_id: str, node_id: str | None = None) -> set[int]: ...
    def remove(self, run_id: str, node_id: str | None = None) -> None: ...
    def runs(self) -> list[str]: ...


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise ResourceError(f"cannot write {value!r} to {path}: {e.strerror}; is this host's cgroup tree writable (root)?") from None


def _read_pids(path: Path) -> set[int]:
    try:
        return {int(x) for x in path.read_text().split()}
    except (FileNotFoundError, ProcessLookupError):
        return set()


def _read_max(path: Path) -> int | None:
    """A `pids.max` value: None for "max" (no limit)."""
    v = path.read_text().strip()
    return None if v == "max" else int(v)


def rmdir_tree(d: Path) -> None:
    """Remove a cgroup directory bottom-up (cgroupfs dirs are removed with rmdir only);
    processes still inside are killed first."""
    if not d.is_dir():
        return
    for sub in sorted((p for p in d.iterdir() if p.is_dir()), reverse=True):
        rmdir_tree(sub)
    if not str(d).startswith(str(SYS_CGROUP) + "/"):
        # a stand-in tree in a plain directory (tests): its control files are real files
        for f in d.iterdir():
            if f.is_file():
                f.unlink()
    for attempt in range(50):
        pids = _read_pids(d / "cgroup.procs")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.ENOTEMPTY) or attempt == 49:
                raise ResourceError(f"cannot remove cgroup {d}: {e.strerror}") from None
            time.sleep(0.02)


class CgroupV1:
    """Separate `cpu` and `memory` hierarchies (this machine), and `pids` where mounted."""

    version = 1

    def __init__(self, root: Path = SYS_CGROUP):
        self.cpu = root / "cpu"
        self.memory = root / "memory"
        self.pids_root = root / "pids" if (root / "pids" / "cgroup.procs").exists() else None
        self.pids_controller = "cgroup v1 pids" if self.pids_root is not None else None

    def _dirs(self, run_id: str, node_id: str | None = None) -> list[Path]:
        rel = cgroup_relpath(run_id, node_id)
        return [self.cpu / rel, self.memory / rel] + ([self.pids_root / rel] if self.pids_root is not None else [])

    def create(self, run_id: str, node_id: str, limits: CgroupLimits) -> list[Path]:
        dirs = self._dirs(run_id, node_id)
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        self.set_limits(run_id, node_id, limits)
        return dirs

    def set_limits(self, run_id: str, node_id: str, limits: CgroupLimits) -> None:
        cpu, mem, *pids = self._dirs(run_id, node_id)
        _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        q = limits.quota_us()
        _write(cpu / "cpu.cfs_quota_us", str(q if q is not None else -1))
        _write(mem / "memory.limit_in_bytes", str(limits.memory_mb * 2**20) if limits.memory_mb else "-1")
        for d in pids:
            _write(d / "pids.max", str(limits.pids_max) if limits.pids_max is not None else "max")

    def read_limits(self, run_id: str, node_id: str) -> CgroupLimits:
        cpu, mem, *pids = self._dirs(run_id, node_id)
        q = int((cpu / "cpu.cfs_quota_us").read_text())
        p = int((cpu / "cpu.cfs_period_us").read_text())
        m = int((mem / "memory.limit_in_bytes").read_text())
        n = _read_max(pids[0] / "pids.max") if pids else None
        return CgroupLimits(None if q < 0 else q / p, None if m >= 2**62 else m // 2**20, n)

    def procs_files(self, run_id: str, node_id: str) -> list[Path]:
        return [d / "cgroup.procs" for d in self._dirs(run_id, node_id)]

    def pids(self, run_id: str, node_id: str | None = None) -> set[int]:
        out: set[int] = set()
        for d in self._dirs(run_id, node_id):
            if d.is_dir():
                for f in d.rglob("cgroup.procs"):
                    out |= _read_pids(f)
        return out

    def remove(self, run_id: str, node_id: str | None = None) -> None:
        for d in self._dirs(run_id, node_id):
            rmdir_tree(d)

    def runs(self) -> list[str]:
        found: set[str] = set()
        for h in (self.cpu, self.memory, self.pids_root):
            top = h / TOP if h is not None else None
            if top is not None and top.is_dir():
                found |= {p.name for p in top.iterdir() if p.is_dir()}
        return sorted(found)


class CgroupV2:
    """The unified hierarchy; controllers are enabled down the path via subtree_control."""

    version = 2

    def __init__(self, root: Path = SYS_CGROUP):
        self.root = root
        ctl = root / "cgroup.controllers"
        have = set(ctl.read_text().split()) if ctl.exists() else set()
        self.pids_controller = "cgroup v2 pids" if "pids" in have else None
        self._controllers = {"cpu", "memory"} | ({"pids"} if self.pids_controller else set())

    def _dir(self, run_id: str, node_id: str | None = None) -> Path:
        return self.root / cgroup_relpath(run_id, node_id)

    def _enable(self, d: Path) -> None:
        ctl = d / "cgroup.subtree_control"
        have = set(ctl.read_text().split()) if ctl.exists() else set()
        want = self._controllers - have
        if want:
            _write(ctl, " ".join(f"+{c}" for c in sorted(want)))

    def create(self, run_id: str, node_id: str, limits: CgroupLimits) -> list[Path]:
        leaf = self._dir(run_id, node_id)
        self._enable(self.root)
        for d in (self.root / TOP, self._dir(run_id)):
            d.mkdir(exist_ok=True)
            self._enable(d)
        leaf.mkdir(exist_ok=True)
        self.set_limits(run_id, node_id, limits)
        return [leaf]

    def set_limits(self, run_id: str, node_id: str, limits: CgroupLimits) -> None:
        d = self._dir(run_id, node_id)
        q = limits.quota_us()
        _write(d / "cpu.max", f"{q if q is not None else 'max'} {CPU_PERIOD_US}")
        _write(d / "memory.max", str(limits.memory_mb * 2**20) if limits.memory_mb else "max")
        if self.pids_controller is not None:
            _write(d / "pids.max", str(limits.pids_max) if limits.pids_max is not None else "max")

    def read_limits(self, run_id: str, node_id: str) -> CgroupLimits:
        d = self._dir(run_id, node_id)
        q, p = (d / "cpu.max").read_text().split()
        m = (d / "memory.max").read_text().strip()
        n = _read_max(d / "pids.max") if self.pids_controller is not None else None
        return CgroupLimits(None if q == "max" else int(q) / int(p), None if m == "max" else int(m) // 2**20, n)

    def procs_files(self, run_id: str, node_id: str) -> list[Path]:
        return [self._dir(run_id, node_id) / "cgroup.procs"]

    def pids(self, run_id: str, node_id: str | None = None) -> set[int]:
        d = self._dir(run_id, node_id)
        out: set[int] = set()
        if d.is_dir():
            for f in d.rglob("cgroup.procs"):
                out |= _read_pids(f)
        return out

    def remove(self, run_id: str, node_id: str | None = None) -> None:
        rmdir_tree(self._dir(run_id, node_id))

    def runs(self) -> list[str]:
        top = self.root / TOP
        return sorted(p.name for p in top.iterdir() if p.is_dir()) if top.is_dir() else []


def detect_cgroups(root: Path = SYS_CGROUP) -> Cgroups:
    """v2 when the unified hierarchy at `root` has the cpu controller, else v1 when the
    v1 cpu hierarchy has CFS quotas; otherwise a ResourceError that says what is missing."""
    controllers = root / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return CgroupV2(root)
    if (root / "cpu" / "cpu.cfs_quota_us").exists() and (root / "memory").is_dir():
        return CgroupV1(root)
    raise ResourceError(
        f"no usable cgroup CPU controller under {root} (neither v2 cpu.max nor v1 cpu.cfs_quota_us); "
        "mount the cpu and memory controllers"
    )
