"""Kernel namespace primitives: create, enter and remove network namespaces fast.

A worker thread `unshare`s a new network namespace, bind-mounts it under /run/netns (so
`ip netns exec NAME` and `nsenter --net=/run/netns/NAME` work) and returns to the root
namespace; netlink sockets are opened inside a namespace the same way and handed to
pyroute2's `AsyncIPRoute(use_socket=...)`. That costs ~1 ms per namespace, where a forked
helper per namespace (pyroute2's default) costs ~20 ms.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from testbed.errors import ResourceError

if TYPE_CHECKING:
    from pyroute2 import AsyncIPRoute

__all__ = [
    "NETNS_DIR",
    "CLONE_NEWNET",
    "netns_path",
    "pids_in_netns",
    "create_netns",
    "remove_netns",
    "list_netns",
    "in_netns",
    "open_iproute",
    "setns_fd",
]

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MS_REC = 16384
_MS_SHARED = 1 << 20
_MNT_DETACH = 2
_NETLINK_ROUTE = 0

_libc = ctypes.CDLL(None, use_errno=True)
_T = TypeVar("_T")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def netns_path(name_or_path: str) -> str:
    """A namespace name (`tb-r1-dev01`) or a path (`/proc/123/ns/net`) -> a path."""
    return name_or_path if "/" in name_or_path else str(NETNS_DIR / name_or_path)


def setns_fd(fd: int) -> None:
    """Move the calling thread into the network namespace open at `fd`."""
    _check(_libc.setns(fd, CLONE_NEWNET), "setns")


def _ensure_netns_dir() -> None:
    """Make /run/netns a shared mount point, as `ip netns add` does."""
    NETNS_DIR.mkdir(parents=True, exist_ok=True)
    d = str(NETNS_DIR).encode()
    if _libc.mount(b"", d, b"none", _MS_SHARED | _MS_REC, None) != 0:
        _check(_libc.mount(d, d, b"none", _MS_BIND | _MS_REC, None), f"bind-mount {NETNS_DIR}")
        _check(_libc.mount(b"", d, b"none", _MS_SHARED | _MS_REC, None), f"make {NETNS_DIR} shared")


_dir_ready = False
_dir_lock = threading.Lock()


def _run_in_thread_ns(target_fd: int | None, fn: Callable[[], _T], *, unshare: bool = False) -> _T:
    """Run `fn` in a fresh thread that entered `target_fd` (or a new namespace); the thread
    dies afterwards, so no pool thread is ever left in a foreign namespace."""
    box: dict[str, object] = {}

    def body() -> None:
        try:
            if unshare:
                _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            elif target_fd is not None:
                setns_fd(target_fd)
            box["v"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["e"] = e

    t = threading.Thread(target=body, name="tb-netns", daemon=True)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]  # type: ignore[misc]
    return box["v"]  # type: ignore[return-value]


def create_netns_sync(name: str) -> socket.socket:
    """Create namespace `name` under /run/netns; return a netlink socket inside it."""
    global _dir_ready
    with _dir_lock:
        if not _dir_ready:
            _ensure_netns_dir()
            _dir_ready = True
    path = NETNS_DIR / name
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    except FileExistsError:
        raise ResourceError(
            f"network namespace {name!r} already exists; remove it with `testbed down --all` "
            f"or `ip netns del {name}`"
        ) from None

    def inside() -> socket.socket:
        src = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
        _check(_libc.mount(src, str(path).encode(), b"none", _MS_BIND, None), f"bind-mount {path}")
        return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_ROUTE)

    try:
        return _run_in_thread_ns(None, inside, unshare=True)
    except BaseException:
        _unlink_quiet(path)
        raise


async def create_netns(name: str) -> socket.socket:
    return await asyncio.to_thread(create_netns_sync, name)


def _unlink_quiet(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def remove_netns(name: str) -> bool:
    """Unmount and remove /run/netns/NAME; True when something was removed. The namespace
    itself dies with its last process and interface reference."""
    path = NETNS_DIR / name
    if not path.exists():
        return False
    rc = _libc.umount2(str(path).encode(), _MNT_DETACH)
    if rc != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
        _check(rc, f"umount {path}")
    _unlink_quiet(path)
    return True


def list_netns(prefix: str = "") -> list[str]:
    try:
        return sorted(p for p in os.listdir(NETNS_DIR) if p.startswith(prefix))
    except FileNotFoundError:
        return []


def in_netns(netns: str, fn: Callable[[], _T]) -> _T:
    """Run `fn` (sync) with the calling code's network namespace set to `netns`."""
    try:
        fd = os.open(netns_path(netns), os.O_RDONLY)
    except FileNotFoundError:
        raise ResourceError(f"network namespace {netns!r} does not exist") from None
    try:
        return _run_in_thread_ns(fd, fn)
    finally:
        os.close(fd)


def netlink_socket_in(netns: str | None) -> socket.socket:
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_ROUTE)
    return in_netns(netns, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_ROUTE))


def open_iproute(netns: str | None = None, sock: socket.socket | None = None) -> AsyncIPRoute:
    """An AsyncIPRoute bound to `netns` (a name under /run/netns, a path such as
    /proc/<pid>/ns/net, or None for the caller's namespace)."""
    from pyroute2 import AsyncIPRoute  # (here: a cell's worker reads run state without pyroute2's import)

    return AsyncIPRoute(use_socket=sock if sock is not None else netlink_socket_in(netns))


def pids_in_netns(ns_files: list[Path]) -> set[int]:
    """Processes (other than this one) whose network namespace is one of `ns_files`."""
    inodes = set()
    for f in ns_files:
        try:
            inodes.add(os.stat(f).st_ino)
        except OSError:
            pass
    pids: set[int] = set()
    if not inodes:
        return pids
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            if os.stat(f"/proc/{p}/ns/net").st_ino in inodes:
                pids.add(int(p))
        except OSError:
            continue
    pids.discard(os.getpid())
    return pids
