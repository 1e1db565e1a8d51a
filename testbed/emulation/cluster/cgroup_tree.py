"""A cgroup subtree in every mounted hierarchy (v1 and v2 alike): make it, place a process
in it, list, kill and remove what is inside.

A cluster node's daemon goes to `testbed-cluster/<cluster>/<node>/daemon` and Docker puts
the node's containers beside it (its cgroup parent), in every hierarchy Docker knows; so
the node's processes are exactly those under `testbed-cluster/<cluster>/<node>`, and
removing a cluster means removing that tree from every hierarchy. `root` makes the module
work against a plain directory (tests).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from testbed.emulation.cgroups import rmdir_tree
from testbed.errors import ResourceError

__all__ = ["SYS_CGROUP", "hierarchies", "make", "procs_files", "pids", "kill", "remove"]

SYS_CGROUP = Path("/sys/fs/cgroup")


def hierarchies(root: Path = SYS_CGROUP) -> list[Path]:
    """Mount points of cgroup (v1) and cgroup2 file systems under `root`, or `root` itself
    when it is one (a v2-only host)."""
    if root != SYS_CGROUP:  # a stand-in tree: its subdirectories are the hierarchies
        return sorted(p for p in root.iterdir() if p.is_dir())
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, mnt = right.split()[0], Path(left.split()[4])
        if fstype in ("cgroup", "cgroup2") and (mnt == root or root in mnt.parents):
            out.append(mnt)
    return sorted(set(out))


def _copy_if_empty(d: Path, name: str) -> None:
    """A v1 cpuset child starts with no CPUs and no memory nodes: take the parent's."""
    f = d / name
    if f.exists() and not f.read_text().strip():
        f.write_text((d.parent / name).read_text())


def _enable_v2(d: Path) -> None:
    """Enable on `d` the controllers its parent offers (v2), for the cgroups below it."""
    ctl = d / "cgroup.subtree_control"
    offered = (d / "cgroup.controllers")
    if not ctl.exists() or not offered.exists():
        return
    want = {"cpu", "memory", "pids", "io", "cpuset"} & set(offered.read_text().split())
    for c in sorted(want - set(ctl.read_text().split())):
        try:
            ctl.write_text(f"+{c}")
        except OSError:
            pass  # a controller the parent keeps to itself: the limits simply do not apply


def make(rel: str, root: Path = SYS_CGROUP) -> list[Path]:
    """`rel` (and its parents) in every hierarchy; returns the leaf directories."""
    leaves = []
    for h in hierarchies(root):
        d = h
        for part in rel.split("/"):
            _enable_v2(d)
            d = d / part
            try:
                d.mkdir(exist_ok=True)
            except OSError as e:
                raise ResourceError(f"cannot make cgroup {d}: {e.strerror}; is this host's cgroup tree writable (root)?") from None
            _copy_if_empty(d, "cpuset.cpus")
            _copy_if_empty(d, "cpuset.mems")
        leaves.append(d)
    return leaves


def procs_files(rel: str, root: Path = SYS_CGROUP) -> list[Path]:
    return [h / rel / "cgroup.procs" for h in hierarchies(root) if (h / rel).is_dir()]


def _read_pids(f: Path) -> set[int]:
    try:
        return {int(x) for x in f.read_text().split()}
    except (OSError, ValueError):
        return set()


def pids(rel: str, root: Path = SYS_CGROUP) -> set[int]:
    """Every process in `rel` or below it, in any hierarchy."""
    out: set[int] = set()
    for h in hierarchies(root):
        d = h / rel
        if d.is_dir():
            for f in d.rglob("cgroup.procs"):
                out |= _read_pids(f)
    return out


def kill(rel: str, timeout_s: float = 10.0, root: Path = SYS_CGROUP) -> set[int]:
    """SIGKILL everything under `rel` until nothing is left (new children of dying parents
    included); returns the pids killed. ResourceError when processes outlive `timeout_s`."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while True:
        left = pids(rel, root) - {os.getpid()}
        if not left:
            return killed
        if time.monotonic() > deadline:
            raise ResourceError(f"processes {sorted(left)[:8]} in cgroup {rel} survived SIGKILL for {timeout_s:g} s")
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def remove(rel: str, root: Path = SYS_CGROUP) -> list[str]:
    """Kill what is inside, then remove `rel` bottom-up in every hierarchy; returns the
    hierarchies' directories removed."""
    kill(rel, root=root)
    removed = []
    for h in hierarchies(root):
        if (h / rel).is_dir():
            rmdir_tree(h / rel)
            removed.append(str(h / rel))
    return removed
