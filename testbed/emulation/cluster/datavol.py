"""The data volume of a cluster: one sparse file formatted ext4 and loop-mounted where the
nodes keep their data roots, removed whole at `down`.

Why not plain directories: a node's data root holds the pulled image, tens of thousands
of files (GBs with torch), and on a host file system mounted with online `discard` (this
machine's) deleting them took 75-120 s per node, where unmounting the volume and deleting
its one file takes about a second; writes are faster too (no journal, no discard). Where
this host has no loop devices, the data roots stay plain directories (`make_volume`
returns False) and `down` is slower.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from testbed.errors import ResourceError

__all__ = ["VOLUME_GB_PER_NODE", "make_volume", "remove_volume", "mounted_at"]

#: The volume's size (sparse: only what is written takes disk space): an image of ~2 GB,
#: its download while it is pulled, and the node's containers.
VOLUME_GB_PER_NODE = 12
_SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"


def _run(argv: list[str], timeout_s: float = 60) -> str:
    binary = shutil.which(argv[0], path=_SBIN)
    if binary is None:
        raise ResourceError(f"{argv[0]} is not installed (`apt-get install e2fsprogs mount`)")
    r = subprocess.run([binary, *argv[1:]], capture_output=True, text=True, timeout=timeout_s)
    if r.returncode != 0:
        raise ResourceError(f"{' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()


def mounted_at(path: Path) -> str | None:
    """The source of the mount at `path` (e.g. /dev/loop3), None when nothing is mounted there."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if left.split()[4] == str(path):
            return right.split()[1]
    return None


def make_volume(image: Path, mountpoint: Path, size_gb: int) -> bool:
    """Make `image` (sparse, ext4 without journal or discard) and mount it at `mountpoint`
    through a loop device; False, with nothing left made, where there are no loop devices
    (or no mkfs.ext4)."""
    if not Path("/dev/loop-control").exists() or any(shutil.which(p, path=_SBIN) is None
                                                     for p in ("losetup", "mkfs.ext4")):
        return False
    with open(image, "wb") as f:
        f.truncate(size_gb * 2**30)
    try:
        _run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E", "nodiscard,lazy_itable_init=1", str(image)])
        try:
            dev = _run(["losetup", "--find", "--show", "--direct-io=on", str(image)])
        except ResourceError:
            image.unlink()  # no free loop device (a container without /dev/loop*): plain directories
            return False
        try:
            _run(["mount", "-o", "noatime", dev, str(mountpoint)])
        except ResourceError:
            _run(["losetup", "-d", dev])
            raise
    except BaseException:
        image.unlink(missing_ok=True)
        raise
    return True


def remove_volume(image: Path, mountpoint: Path) -> list[str]:
    """Unmount `mountpoint` (lazily if something still holds it), detach its loop device,
    delete `image`; returns what was removed."""
    removed = []
    dev = mounted_at(mountpoint)
    if dev is not None:
        try:
            _run(["umount", str(mountpoint)])
        except ResourceError:
            _run(["umount", "-l", str(mountpoint)])
        removed.append(f"mount {mountpoint}")
    if image.exists() and shutil.which("losetup", path=_SBIN):
        for line in _run(["losetup", "-j", str(image)]).splitlines():
            loop = line.split(":", 1)[0]
            subprocess.run(["losetup", "-d", loop], capture_output=True)
            removed.append(f"loop device {loop}")
    if image.exists():
        os.unlink(image)
        removed.append(f"file {image}")
    return removed
