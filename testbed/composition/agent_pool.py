"""Agent template ("fork server"): import torch + diffusers once, fork each device agent into its node.

Importing torch and diffusers costs ~6 s of CPU per process; 20 fresh agents on 2 cores
would take minutes to come up. The runner starts one template per run (in the host's
namespace); for each device it sends, over a unix socket, the agent's argv/env/log path
plus *file descriptors* (SCM_RIGHTS) of the node's network namespace and cgroup.procs
files, opened by the runner from the emulation's names. The template forks; the child
starts its own session, joins the cgroups, enters the namespace (setns), retitles itself
`testbed-agent <run> <device>` (so `ps`/`pgrep -f` find it) and runs the agent's main.
Forked agents share the template's pages (copy-on-write): lower PSS than fresh processes.

Part of the composition layer: it joins the relay agent to the emulation's kernel objects.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from testbed.errors import ResourceError

__all__ = ["AgentPool", "serve"]

_MAX_FDS = 32  # netns + one cgroup.procs per hierarchy + a container's other namespaces


def _preload() -> None:
    """Everything an agent imports, imported once here (no torch op runs: no thread pools
    exist at fork time)."""
    import aiomqtt  # noqa: F401
    import diffusers  # noqa: F401
    import safetensors.numpy  # noqa: F401
    import torch  # noqa: F401
    from diffusers import DDIMScheduler, UNet2DModel  # noqa: F401

    import testbed.diffusion.models  # noqa: F401
    import testbed.diffusion.stages  # noqa: F401
    import testbed.relay.agent  # noqa: F401
    import testbed.relay.stage  # noqa: F401


def _child(req: dict[str, Any], fds: list[int]) -> int:
    from setproctitle import setproctitle

    from testbed.emulation.nsutil import setns_fd

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    n_cg = int(req.get("cgroup_fds", 0))
    for fd in fds[1 : 1 + n_cg]:  # cgroup.procs files: "0" moves the writer
        os.write(fd, b"0")
    if req.get("netns_fd", True):
        setns_fd(fds[0])
    for fd in fds[1 + n_cg : 1 + n_cg + int(req.get("extra_ns_fds", 0))]:
        _setns_any(fd)  # e.g. a container's mnt/uts/ipc (this child is single-threaded)
    for fd in fds:
        os.close(fd)
    os.environ.update(req.get("env") or {})
    argv = [str(a) for a in req["argv"]]
    setproctitle(" ".join(argv))
    sys.argv = argv
    from testbed.relay.agent import main

    try:
        main(argv[1:])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    return 0


def _setns_any(fd: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def serve(sock_path: str) -> None:
    """The template's loop: one fork per request, answered with {"pid": N}."""
    t0 = time.perf_counter()
    _preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps finished agents
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = Path(sock_path)
    path.unlink(missing_ok=True)
    srv.bind(str(path))
    os.chmod(path, 0o600)
    srv.listen(64)
    print(f"agent template ready in {time.perf_counter() - t0:.2f} s (pid {os.getpid()})", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(conn, 65536, _MAX_FDS)
                if not msg:  # a readiness probe: connected and closed
                    continue
                req = json.loads(msg)
            except (OSError, ValueError) as e:
                print(f"bad request: {e}", flush=True)
                continue
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    srv.close()
                    conn.close()
                    code = _child(req, fds)
                except BaseException:  # noqa: BLE001 - the child must never return into the loop
                    traceback.print_exc()
                finally:
                    os._exit(code)
            for fd in fds:
                os.close(fd)
            conn.sendall(json.dumps({"pid": pid}).encode())


class AgentPool:
    """Runner side: start the template, ask it for agents, stop it."""

    def __init__(self, sock_path: Path, log_path: Path):
        self.sock_path, self.log_path = Path(sock_path), Path(log_path)
        self.pid: int | None = None

    async def start(self, timeout_s: float = 180.0) -> float:
        from testbed.emulation.procs import spawn_in

        t0 = time.monotonic()
        self.sock_path.unlink(missing_ok=True)
        proc = await asyncio.to_thread(spawn_in, None, [sys.executable, "-m", "testbed.composition.agent_pool", str(self.sock_path)],
                                       None, self.log_path)
        self.pid = proc.pid
        while not self._accepts():
            if proc.poll() is not None:
                raise ResourceError(f"the agent template exited with code {proc.returncode}; see {self.log_path}")
            if time.monotonic() - t0 > timeout_s:
                raise ResourceError(f"the agent template did not start within {timeout_s:g} s; see {self.log_path}")
            await asyncio.sleep(0.1)
        return time.monotonic() - t0

    def _accepts(self) -> bool:
        if not self.sock_path.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            return s.connect_ex(str(self.sock_path)) == 0

    def _spawn_sync(self, netns: str | None, cgroup_procs: list[Path], argv: list[str], env: dict[str, str],
                    log_path: Path, extra_ns: list[str] = ()) -> int:
        from testbed.emulation.nsutil import netns_path

        fds = [os.open(netns_path(netns), os.O_RDONLY) if netns else os.open("/", os.O_RDONLY)]
        try:
            fds += [os.open(p, os.O_WRONLY) for p in cgroup_procs]
            fds += [os.open(p, os.O_RDONLY) for p in extra_ns]
            req = {"argv": argv, "env": env, "log": str(log_path), "cgroup_fds": len(cgroup_procs),
                   "netns_fd": bool(netns), "extra_ns_fds": len(extra_ns)}
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(30)
                s.connect(str(self.sock_path))
                socket.send_fds(s, [json.dumps(req).encode()], fds)
                reply = json.loads(s.recv(4096))
            return int(reply["pid"])
        finally:
            for fd in fds:
                os.close(fd)

    async def spawn(self, netns: str | None, cgroup_procs: list[Path], argv: list[str], env: dict[str, str],
                    log_path: Path, extra_ns: list[str] = ()) -> int:
        try:
            return await asyncio.to_thread(self._spawn_sync, netns, cgroup_procs, argv, env, log_path, list(extra_ns))
        except (OSError, ValueError, KeyError) as e:
            raise ResourceError(f"the agent template could not start {argv[1:3]}: {e}; see {self.log_path}") from None

    async def close(self) -> None:
        from testbed.emulation.procs import stop_pid

        if self.pid is not None:
            await stop_pid(self.pid)
            self.pid = None
        self.sock_path.unlink(missing_ok=True)


if __name__ == "__main__":
    serve(sys.argv[1])
