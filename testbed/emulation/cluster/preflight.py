"""What a cluster needs from this machine, checked before anything is made: root, the
programs (with the Debian package that has each), overlay and cgroup file systems. A miss
is a ResourceError (exit 4) that names the fix. IPVS is not needed: without it Swarm has
no routing mesh (`notes()` says what that means)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from testbed.emulation.cluster import cgroup_tree
from testbed.emulation.cluster.daemons import SBIN_PATH
from testbed.errors import ResourceError

__all__ = ["PROGRAMS", "check_host", "notes"]

#: program -> the Debian package that installs it
PROGRAMS = {
    "dockerd": "docker.io", "containerd": "containerd", "runc": "runc", "docker-init": "tini",
    "docker-registry": "docker-registry", "unshare": "util-linux", "mountpoint": "util-linux",
    "mount": "mount", "hostname": "hostname", "iptables": "iptables", "ldd": "libc-bin", "sh": "dash",
}


def check_host() -> None:
    if os.geteuid() != 0:
        raise ResourceError("a cluster needs root (namespaces, Docker daemons, cgroups, iptables); run it with sudo")
    missing = {p: pkg for p, pkg in PROGRAMS.items() if shutil.which(p, path=SBIN_PATH) is None}
    if missing:
        raise ResourceError(f"missing programs for a cluster: {', '.join(sorted(missing))}; "
                            f"`apt-get install {' '.join(sorted(set(missing.values())))}`")
    filesystems = Path("/proc/filesystems").read_text()
    if "overlay" not in filesystems.split():
        raise ResourceError("this kernel has no overlay file system (Docker's overlay2 storage needs it): `modprobe overlay`")
    if not cgroup_tree.hierarchies():
        raise ResourceError("no cgroup hierarchy is mounted under /sys/fs/cgroup; mount cgroup2 (or the v1 controllers)")


def notes() -> list[str]:
    """What this kernel cannot do that a cluster's user should know."""
    out = []
    if not Path("/proc/net/ip_vs").exists():
        out.append("no IPVS in this kernel: Swarm has no routing mesh here (published ports and VIP services do "
                   "not work); services use endpoint_mode dnsrr")
    return out
