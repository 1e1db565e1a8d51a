"""The one agent launcher: a template process forks each device's agent into its node.

Importing torch and diffusers costs seconds of CPU per process; 20 fresh agents on 2
cores would take minutes to come up. One template per cell imports them once (it runs in
the host's namespace); for each device the launcher sends it, over a unix socket, the
agent's argv, environment and log path plus *file descriptors* (SCM_RIGHTS) of what the
node is made of — `cell.join(device)`: its network namespace, one `cgroup.procs` per
hierarchy, and for a container its mount, UTS and IPC namespaces. The template forks; the
child starts its own session, opens its log, joins the cgroups, enters the namespaces,
makes its model variant (still root: its uid may not read e.g. a Hugging Face cache under
/root; the memory counts in the node's cgroup), then drops privileges to the device's own uid (allocated for the run, node_uids.py:
setgroups([]), setgid, setuid, no_new_privs) and only then runs the agent, which opens
its own config (`agents/<device>.json`, 0400, owned by that uid). The template never opens
a config or a credential. The same path serves every backend, the first start and every
revival. Forked agents share the template's pages (copy-on-write).

One agent per device serves every collaboration method (relay/agent.py dispatches tasks
by `meta.method`). `agent_config` is the one function that builds an agent's
`AgentConfig`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Protocol

from testbed.emulation.cell import Cell
from testbed.emulation.control import call
from testbed.emulation.node_uids import drop_privileges
from testbed.errors import ResourceError
from testbed.model.profiles import load_profiles, step_time_s
from testbed.model.radio import DeviceLink
from testbed.model.topology import Topology
from testbed.relay.agent import AgentConfig
from testbed.relay.security import Credential

__all__ = ["agent_config", "Agents", "AgentLauncher", "RemoteAgents", "serve_template", "enter_node", "AGENT_TITLE"]

AGENT_TITLE = "testbed-agent"  # processes are titled `testbed-agent <run> <device>`
_MAX_FDS = 32  # netns + one cgroup.procs per hierarchy + a container's other namespaces


def agent_config(topo: Topology, link: DeviceLink, run_id: str, cred: Credential, broker_host: str,
                 broker_port: int, cpu_cores: float, max_message_bytes: int) -> AgentConfig:
    """What a device's agent needs: the broker, its own credential, its model variant and
    the profile's step time it pads to (`compute: profile`)."""
    wl = topo.workload
    prof = load_profiles()[link.profile]
    return AgentConfig(run=run_id, device=link.id, broker_host=broker_host, broker_port=broker_port,
                       username=cred.username, password=cred.password, model=wl.model, precision=link.precision,
                       compute=wl.compute, step_time_s=step_time_s(prof, wl.resolution_px, link.precision),
                       cpu_cores=cpu_cores, payload_bytes=wl.payload_bytes, max_message_bytes=max_message_bytes)


class Agents(Protocol):
    """The device agents of a run: started by this process, or kept by a `testbed up` cell."""

    async def ensure(self, devices: list[str]) -> None:
        """Every listed device that is not killed has a live agent (started when missing)."""
        ...

    async def revive(self, device: str) -> int:
        """The device is up again with a fresh agent; returns its pid."""
        ...

    def pids(self) -> dict[str, int]: ...
    async def close(self) -> None: ...


# -- the template process ---------------------------------------------------------------

_PRELOAD_ENV = "TESTBED_TEMPLATE_PRELOAD"  # "model:precision,model:precision": variants to load before forking


def _preload() -> None:
    """Everything an agent imports, imported once here, and the model variants named in
    $TESTBED_TEMPLATE_PRELOAD made once (each forked agent takes its own, copy-on-write).
    One torch thread: building a model then runs no parallel region, so no thread pool
    exists at fork time (a forked child cannot use its parent's OpenMP threads)."""
    import aiomqtt  # noqa: F401
    import diffusers  # noqa: F401
    import safetensors.numpy  # noqa: F401
    import torch
    from diffusers import DDIMScheduler, UNet2DModel  # noqa: F401

    import testbed.diffusion.models  # noqa: F401
    import testbed.diffusion.stages  # noqa: F401
    import testbed.relay.stage  # noqa: F401
    from testbed.relay.agent import METHOD_HANDLERS

    for where in METHOD_HANDLERS.values():  # an agent (its own uid) may not read the interpreter's files later
        importlib.import_module(where.partition(":")[0])
    from testbed.relay.stage import StageModel

    torch.set_num_threads(1)
    for item in filter(None, os.environ.get(_PRELOAD_ENV, "").split(",")):
        name, _, precision = item.partition(":")
        StageModel.preload(name, precision)


def _setns(fd: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def enter_node(fds: list[int], cgroup_fds: int, netns_fd: bool, extra_ns_fds: int) -> None:
    """Join a node as root (what `cell.join` names, received as open files): its cgroups
    (writing "0" to each `cgroup.procs` moves the writer), its network namespace and a
    container's mount, UTS and IPC namespaces. Closes the files."""
    for fd in fds[1:1 + cgroup_fds]:
        os.write(fd, b"0")
    if netns_fd:
        _setns(fds[0])
    for fd in fds[1 + cgroup_fds:1 + cgroup_fds + extra_ns_fds]:
        _setns(fd)  # a container's mnt/uts/ipc (this child is single-threaded)
    for fd in fds:
        os.close(fd)


def _close_inherited(keep: list[int]) -> None:
    """Close every descriptor but stdin/stdout/stderr and `keep`: none of the root
    template's files may reach the agent. (Before entering a container: its /proc does
    not show this process.)"""
    for fd in [int(n) for n in os.listdir("/proc/self/fd")]:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _child(req: dict[str, Any], fds: list[int]) -> int:
    from setproctitle import setproctitle

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # as root, on the host
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    _close_inherited(keep=fds)
    enter_node(fds, int(req["cgroup_fds"]), bool(req["netns_fd"]), int(req["extra_ns_fds"]))
    if req.get("model"):  # inside the node (its memory counts), before the uid that cannot read e.g. /root/.cache
        _load_model(*req["model"])
    drop_privileges(int(req["uid"]))
    os.chdir("/")
    os.environ.update(req.get("env") or {})
    argv = [str(a) for a in req["argv"]]
    setproctitle(" ".join(argv))
    sys.argv = argv
    from testbed.relay.agent import main

    try:
        main(argv[1:])  # the agent opens its own config, as its own uid
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    return 0


def _load_model(name: str, precision: str) -> None:
    """The agent's model variant, made before privileges drop (the template's copy when it
    made one); a failure is left to the agent, which loads again and reports it."""
    from testbed.relay.stage import StageModel

    try:
        StageModel.preload(name, precision)
    except Exception as e:  # noqa: BLE001 - the agent's own load says what is wrong
        print(f"note: loading {name}/{precision} before dropping privileges failed: {e}", flush=True)


def _private_parent(path: str) -> Path | None:
    """The first directory above `path` that other users cannot search, if any."""
    for d in reversed(Path(path).resolve().parents):
        with contextlib.suppress(OSError):
            if not d.stat().st_mode & 0o001:
                return d
    return None


def serve_template(sock_path: str) -> None:
    """The template's loop: one fork per request, answered with {"pid": N}."""
    t0 = time.perf_counter()
    _preload()
    for where in {sys.base_prefix, sys.prefix}:
        if (d := _private_parent(where)) is not None:  # e.g. a pyenv Python under /root (0700)
            print(f"note: agents run as their own uids and cannot enter {d}: they can import only what this "
                  f"template imported from {where} (install Python outside a private directory to lift this)",
                  flush=True)
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


# -- the launcher ------------------------------------------------------------------------

class AgentLauncher:
    """Agents of one cell, started by this process through its template.

    A device's agent reads `<state dir>/agents/<device>.json` (written by the run owner
    with `agent_config`, owned by the device's uid). `start()` may begin before the cell
    exists, so that the template's imports overlap the cell's creation; `bind(cell, uids)`
    (the devices' uids, node_uids.py) comes before spawning.
    """

    def __init__(self, run_id: str, state_dir: Path, logs_dir: Path, preload: list[tuple[str, str]] | None = None):
        self.run_id = run_id
        self.preload = list(preload or [])  # (model, precision) variants the template makes before forking
        self.state_dir, self.logs_dir = Path(state_dir), Path(logs_dir)
        self.sock_path = self.state_dir / "agent-template.sock"
        self.template_pid: int | None = None
        self._template: Any = None
        self._ready: asyncio.Future | None = None
        self._pids: dict[str, int] = {}
        self.cell: Cell | None = None
        self.uids: dict[str, int] = {}

    def bind(self, cell: Cell, uids: dict[str, int]) -> None:
        self.cell = cell
        self.uids = dict(uids)

    def config_path(self, device: str) -> Path:
        return self.state_dir / "agents" / f"{device}.json"

    def start(self) -> asyncio.Future:
        """Start the template (idempotent); the future resolves to its start-up seconds."""
        if self._ready is None:
            self._ready = asyncio.ensure_future(self._start_template())
        return self._ready

    async def _start_template(self, timeout_s: float = 180.0) -> float:
        from testbed.emulation.procs import spawn_in

        t0 = time.monotonic()
        self.sock_path.unlink(missing_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log = self.logs_dir / "agent-template.log"
        env = {_PRELOAD_ENV: ",".join(f"{m}:{p}" for m, p in self.preload)}
        proc = await asyncio.to_thread(spawn_in, None, [sys.executable, "-m", "testbed.composition.agents",
                                                        str(self.sock_path)], env, log)
        self._template, self.template_pid = proc, proc.pid
        while not await asyncio.to_thread(self._accepts):
            if proc.poll() is not None:
                raise ResourceError(f"the agent template exited with code {proc.returncode}; see {log}")
            if time.monotonic() - t0 > timeout_s:
                raise ResourceError(f"the agent template did not start within {timeout_s:g} s; see {log}")
            await asyncio.sleep(0.05)
        return time.monotonic() - t0

    def _accepts(self) -> bool:
        if not self.sock_path.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            return s.connect_ex(str(self.sock_path)) == 0

    def _fork_sync(self, join: Any, uid: int, argv: list[str], env: dict[str, str], log_path: Path,
                   model: list[str] | None = None) -> int:
        fds = [os.open(join.netns, os.O_RDONLY) if join.netns else os.open("/", os.O_RDONLY)]
        try:
            fds += [os.open(p, os.O_WRONLY) for p in join.cgroup_procs]
            fds += [os.open(p, os.O_RDONLY) for p in join.extra_ns]
            req = {"argv": argv, "env": env, "log": str(log_path), "cgroup_fds": len(join.cgroup_procs),
                   "netns_fd": bool(join.netns), "extra_ns_fds": len(join.extra_ns), "uid": uid, "model": model}
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(30)
                s.connect(str(self.sock_path))
                socket.send_fds(s, [json.dumps(req).encode()], fds)
                reply = json.loads(s.recv(4096))
            return int(reply["pid"])
        finally:
            for fd in fds:
                os.close(fd)

    async def spawn(self, device: str) -> int:
        """Fork `device`'s agent into its node; returns its pid."""
        if self.cell is None:
            raise ResourceError("agent launcher: no cell bound")
        if device not in self.uids:
            raise ResourceError(f"agent launcher: no uid allocated for {device}")
        await self.start()
        join = await self.cell.join(device)
        cfg = self.config_path(device)
        cores = self.cell.nodes[device].cpu_quota_cores or float(os.cpu_count() or 1)
        env = {"TESTBED_AGENT_CONFIG": str(cfg), "OMP_NUM_THREADS": str(max(1, int(cores)))}
        argv = [AGENT_TITLE, self.run_id, device, "--config", str(cfg)]
        try:
            doc = json.loads(cfg.read_text())
            model = [str(doc["model"]), str(doc["precision"])]
        except (OSError, ValueError, KeyError):
            model = None  # the agent reports its config's problem itself
        try:
            pid = await asyncio.to_thread(self._fork_sync, join, self.uids[device], argv, env,
                                          self.logs_dir / f"agent-{device}.log", model)
        except (OSError, ValueError, KeyError) as e:
            raise ResourceError(f"the agent template could not start {device}'s agent: {e}; "
                                f"see {self.logs_dir / 'agent-template.log'}") from None
        self._pids[device] = pid
        return pid

    async def ensure(self, devices: list[str]) -> None:
        from testbed.emulation.procs import pid_alive

        assert self.cell is not None
        todo = [d for d in devices if self.cell.nodes[d].state != "killed"
                and not (d in self._pids and pid_alive(self._pids[d]))]
        await asyncio.gather(*(self.spawn(d) for d in todo))

    async def revive(self, device: str) -> int:
        assert self.cell is not None
        await self.cell.revive(device)
        await self.stop(device)
        return await self.spawn(device)

    async def stop(self, device: str) -> None:
        from testbed.emulation.procs import stop_pid

        pid = self._pids.pop(device, None)
        if pid is not None:
            await stop_pid(pid, timeout_s=2.0)

    def pids(self) -> dict[str, int]:
        from testbed.emulation.procs import pid_alive

        return {d: p for d, p in self._pids.items() if pid_alive(p)}

    async def close(self) -> None:
        from testbed.emulation.procs import stop_pid

        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
        if self._ready is not None:
            await asyncio.gather(self._ready, return_exceptions=True)
        # Every agent at once (not one executor thread at a time), then the template: it reaps
        # its agents (SIGCHLD ignored); gone first, it would leave them to pid 1 as zombies
        # that still hold their uids until pid 1 gets round to them.
        for group in (list(self._pids.values()), [self.template_pid] if self.template_pid is not None else []):
            for pid in group:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGTERM)
            await asyncio.gather(*(stop_pid(p, timeout_s=2.0) for p in group), return_exceptions=True)
        self._pids.clear()
        self.template_pid = None
        self.sock_path.unlink(missing_ok=True)


class RemoteAgents:
    """The agents that a `testbed up` cell keeps, driven through its supervisor."""

    def __init__(self, control_path: Path):
        self.path = control_path

    async def ensure(self, devices: list[str]) -> None:
        await call(self.path, "agents_ensure", devices=list(devices))

    async def revive(self, device: str) -> int:
        return int(await call(self.path, "agents_revive", device=device))

    def pids(self) -> dict[str, int]:
        from testbed.emulation.control import call_sync

        return {d: int(p) for d, p in (call_sync(self.path, "agents_pids") or {}).items()}

    async def close(self) -> None:
        """The agents stay with their cell."""


if __name__ == "__main__":
    serve_template(sys.argv[1])
