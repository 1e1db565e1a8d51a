"""Start and stop processes inside a node's network namespace and cgroups.

The child enters the namespace (`setns`) and its cgroups (writes itself to
`cgroup.procs`) before `exec`, so not even its first instruction runs outside them. Each
child leads its own session (process group), so `stop()` ends it and its children, and
starts from an allow-listed environment (environ.py).

A child dies with its owner (`die_with_owner`, the default): its pre-exec sets
PR_SET_PDEATHSIG (SIGKILL) and checks that the owner is still its parent, so a broker or
an agent template outlives no `kill -9` of the process that started it. The kernel sends
that signal when the *thread* that forked exits, so these children are forked by one
long-lived thread (`_Spawner`), never by an executor thread that may go away first; and a
change of user id clears it, so a child that must run as another user (`run_as`: the
broker as its own user) changes it in the pre-exec first and sets the signal after.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from testbed.emulation.environ import clean_environ
from testbed.errors import ResourceError

__all__ = ["spawn_in", "stop_pid", "pid_alive", "die_with_parent"]

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """This process gets `sig` when its parent (`parent_pid`, read before the fork) dies;
    it exits at once when the parent is already gone (it died before the call). Call it
    after any change of user id: a uid change clears the setting."""
    if _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        os._exit(126)
    if os.getppid() != parent_pid:
        os._exit(126)


class _Spawner:
    """One long-lived daemon thread that runs every fork of a child that dies with its
    owner (PR_SET_PDEATHSIG fires when the forking thread exits, not the process)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def call(self, fn, *args):
        if threading.current_thread() is self._thread:
            return fn(*args)
        with self._lock:  # (a forked copy of this process finds the thread dead and starts its own)
            if self._thread is None or not self._thread.is_alive():
                self._jobs = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._serve, name="testbed-spawner", daemon=True)
                self._thread.start()
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, args, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            fn, args, done = self._jobs.get()
            try:
                done.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                done.set_exception(e)


_spawner = _Spawner()


def spawn_in(
    netns: str | None,
    argv: Sequence[str],
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    cgroup_procs: Sequence[Path] = (),
    cwd: str | None = None,
    *,
    run_as: tuple[int, int] | None = None,
    die_with_owner: bool = True,
) -> subprocess.Popen:
    """Start `argv` inside `netns` (name or path; None = the caller's) and the cgroups
    whose `cgroup.procs` files are given; stdout+stderr go to `log_path`. Its environment
    is the allow-listed part of this one (environ.clean_environ: no HF_TOKEN, no key, HOME
    harmless) plus `env`. `run_as` (uid, gid): the child becomes that user (no
    supplementary group) after joining the node. `die_with_owner`: SIGKILLed when this
    process dies (see the module docstring)."""
    from testbed.emulation.nsutil import CLONE_NEWNET, netns_path  # (pyroute2: not for the agent template)

    if not argv:
        raise ResourceError("spawn: empty command line")
    ns_fd = os.open(netns_path(netns), os.O_RDONLY) if netns else -1
    procs_fds = [os.open(p, os.O_WRONLY) for p in cgroup_procs]
    log = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    owner = os.getpid()

    def enter() -> None:  # runs in the child between fork and exec
        for fd in procs_fds:
            os.write(fd, b"0")
        if ns_fd >= 0 and _libc.setns(ns_fd, CLONE_NEWNET) != 0:
            os._exit(126)
        if run_as is not None:
            os.setgroups([])
            os.setgid(run_as[1])
            os.setuid(run_as[0])
        if die_with_owner:
            die_with_parent(owner)

    def start() -> subprocess.Popen:
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

    try:
        return _spawner.call(start) if die_with_owner else start()
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
