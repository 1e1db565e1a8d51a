"""cgroups.py without root: v1 and v2 logic against stand-in trees in a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.emulation.cgroups import CgroupLimits, CgroupV1, CgroupV2, detect_cgroups
from testbed.errors import ResourceError


def _v2_root(tmp_path: Path) -> Path:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    return tmp_path


def test_v2_writes_cpu_max_memory_max_and_enables_controllers(tmp_path: Path) -> None:
    cg = CgroupV2(_v2_root(tmp_path))
    [leaf] = cg.create("r1", "dev01", CgroupLimits(cpu_cores=0.5, memory_mb=1536, pids_max=512))
    assert leaf == tmp_path / "testbed" / "r1" / "dev01"
    assert (leaf / "cpu.max").read_text() == "50000 100000"
    assert (leaf / "memory.max").read_text() == str(1536 * 2**20)
    assert (leaf / "pids.max").read_text() == "512" and cg.pids_controller == "cgroup v2 pids"
    # every level above the leaf delegates cpu, memory and pids
    for d in (tmp_path, tmp_path / "testbed", tmp_path / "testbed" / "r1"):
        assert (d / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert cg.read_limits("r1", "dev01") == CgroupLimits(0.5, 1536, 512)
    assert cg.runs() == ["r1"]


def test_v2_unlimited_and_change(tmp_path: Path) -> None:
    cg = CgroupV2(_v2_root(tmp_path))
    cg.create("r1", "server", CgroupLimits(None, None))
    leaf = tmp_path / "testbed" / "r1" / "server"
    assert (leaf / "cpu.max").read_text() == "max 100000"
    assert (leaf / "memory.max").read_text() == "max" and (leaf / "pids.max").read_text() == "max"
    cg.set_limits("r1", "server", CgroupLimits(2.0, 64))
    assert cg.read_limits("r1", "server") == CgroupLimits(2.0, 64)


def test_v2_without_the_pids_controller_limits_cpu_and_memory_only(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    cg = CgroupV2(tmp_path)
    [leaf] = cg.create("r1", "dev01", CgroupLimits(0.5, 64, pids_max=512))
    assert cg.pids_controller is None and not (leaf / "pids.max").exists()
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu +memory"


def test_v2_pids_and_remove(tmp_path: Path) -> None:
    cg = CgroupV2(_v2_root(tmp_path))
    cg.create("r2", "dev01", CgroupLimits(1.0, 100))
    cg.create("r2", "dev02", CgroupLimits(1.0, 100))
    assert cg.procs_files("r2", "dev01") == [tmp_path / "testbed" / "r2" / "dev01" / "cgroup.procs"]
    cg.remove("r2")
    assert not (tmp_path / "testbed" / "r2").exists()
    assert cg.runs() == []
    cg.remove("r2")  # idempotent


def test_v1_two_hierarchies(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    (tmp_path / "memory").mkdir()
    cg = detect_cgroups(tmp_path)
    assert isinstance(cg, CgroupV1) and cg.pids_controller is None  # no pids hierarchy mounted here
    cpu, mem = cg.create("r3", "dev01", CgroupLimits(0.25, 512, pids_max=100))
    assert (cpu / "cpu.cfs_quota_us").read_text() == "25000"
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (mem / "memory.limit_in_bytes").read_text() == str(512 * 2**20)
    assert cg.read_limits("r3", "dev01") == CgroupLimits(0.25, 512)
    assert cg.runs() == ["r3"]
    cg.remove("r3", "dev01")
    assert not cpu.exists() and not mem.exists()


def test_detect_prefers_v2_with_cpu_and_rejects_neither(tmp_path: Path) -> None:
    v2 = tmp_path / "a"
    v2.mkdir()
    assert isinstance(detect_cgroups(_v2_root(v2)), CgroupV2)
    empty = tmp_path / "b"
    empty.mkdir()
    (empty / "cgroup.controllers").write_text("hugetlb\n")  # v2 without cpu (this VM's unified tree)
    with pytest.raises(ResourceError, match="no usable cgroup CPU controller"):
        detect_cgroups(empty)


def test_quota_has_a_floor() -> None:
    assert CgroupLimits(0.001, None).quota_us() == 1000  # the kernel's minimum quota is 1 ms


def test_v1_pids_hierarchy_where_mounted(tmp_path: Path) -> None:
    for d in ("cpu", "memory", "pids"):
        (tmp_path / d).mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    (tmp_path / "pids" / "cgroup.procs").write_text("")
    cg = detect_cgroups(tmp_path)
    assert cg.pids_controller == "cgroup v1 pids"
    cpu, mem, pids = cg.create("r4", "dev01", CgroupLimits(0.25, 512, pids_max=256))
    assert (pids / "pids.max").read_text() == "256"
    assert cg.procs_files("r4", "dev01")[-1] == pids / "cgroup.procs"  # a spawned process joins it too
    assert cg.read_limits("r4", "dev01") == CgroupLimits(0.25, 512, 256)
    cg.remove("r4")
    assert cg.runs() == [] and not pids.exists()
