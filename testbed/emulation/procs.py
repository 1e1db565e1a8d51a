"""Start and stop processes inside a node's network namespace and cgroups.

The child enters the namespace (`setns`) and its cgroups (writes itself to
`cgroup.procs`) before `exec`, so not even its first instruction runs outside them. Each
child leads its own session (process group), so `stop()` ends it and its children, and
starts from an allow-listed environment (environ.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from testbed.emulation.environ import clean_environ
from testbed.emulation.nsutil import CLONE_NEWNET, netns_path
from testbed.errors import ResourceError

__all__ = ["spawn_in", "stop_pid", "pid_alive"]

_libc = ctypes.CDLL(None, use_errno=True)


def spawn_in(
    netns: str | None,
    argv: Sequence[str],
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    cgroup_procs: Sequence[Path] = (),
    cwd: str | None = None,
) -> subprocess.Popen:
    """Start `argv` inside `netns` (name or path; None = the caller's) and the cgroups
    whose `cgroup.procs` files are given; stdout+stderr go to `log_path`. Its environment
    is the allow-listed part of this one (environ.clean_environ: no HF_TOKEN, no key, HOME
    harmless) plus `env`."""
    if not argv:
        raise ResourceError("spawn: empty command line")
    ns_fd = os.open(netns_path(netns), os.O_RDONLY) if netns else -1
    procs_fds = [os.open(p, os.O_WRONLY) for p in cgroup_procs]
    log = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115

    def enter() -> None:  # runs in the child between fork and exec
        for fd in procs_fds:
            os.write(fd, b"0")
        if ns_fd >= 0 and _libc.setns(ns_fd, CLONE_NEWNET) != 0:
            os._exit(126)

    try:
        return subprocess.Popen(
            list(argv),
            env=clean_environ(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=enter,
            start_new_session=True,
            cwd=cwd,
        )
    except FileNotFoundError:
        raise ResourceError(f"spawn: {argv[0]!r} not found; install it or give its full path") from None
    finally:
        if ns_fd >= 0:
            os.close(ns_fd)
        for fd in procs_fds:
            os.close(fd)
        if log is not subprocess.DEVNULL:
            log.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_pid_sync(pid: int, timeout_s: float = 3.0) -> None:
    """SIGTERM the process group led by `pid`, SIGKILL after `timeout_s`."""
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(pid)
        if not pid_alive(pid):
            return
        time.sleep(0.02)
    _signal_group(pid, signal.SIGKILL)
    for _ in range(100):
        _reap(pid)
        if not pid_alive(pid):
            return
        time.sleep(0.01)


async def stop_pid(pid: int, timeout_s: float = 3.0) -> None:
    await asyncio.to_thread(stop_pid_sync, pid, timeout_s)
