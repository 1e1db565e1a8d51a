"""The agents of a run: the one launcher (through the agent template), the up cell's, a
deployment's — and the one function that builds an agent's config.

One agent per device serves every collaboration method (relay/agent.py dispatches tasks
by `meta.method`, methods/device.py hands it the registry's handlers). `AgentLauncher`
starts the template (template.py) and asks it to fork each device's agent into its node —
on every backend, for the first start and every revival. `agent_config` is the one
function that builds an `AgentConfig`; `write_agent_configs` writes each device's, readable
only by the uid allocated to its agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from testbed.composition.template import PRELOAD_ENV
from testbed.emulation.cell import Cell
from testbed.emulation.control import call
from testbed.errors import ResourceError
from testbed.model.names import MQTT_PORT, SERVER_ADDRESS
from testbed.model.profiles import load_profiles, step_time_s
from testbed.model.radio import DeviceLink
from testbed.model.topology import Topology
from testbed.relay.agent import AgentConfig
from testbed.relay.security import Credential, RunCredentials

__all__ = ["agent_config", "write_agent_configs", "Agents", "AgentLauncher", "RemoteAgents", "ExternalAgents",
           "AGENT_TITLE"]

AGENT_TITLE = "testbed-agent"  # processes are titled `testbed-agent <run> <device>`


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


def write_agent_configs(state_dir: Path, topo: Topology, cell: Cell, run_id: str, creds: RunCredentials,
                        max_message_bytes: int) -> dict[str, int]:
    """Each device's config, readable only by the uid allocated to its agent (0400);
    agents/ lets them reach their own file but not list the others. The uids."""
    from testbed.emulation.node_uids import allocate_uids, hand_to

    agents = state_dir / "agents"
    agents.mkdir(mode=0o711, exist_ok=True)
    agents.chmod(0o711)
    uids = allocate_uids(state_dir, [link.id for link in cell.links])
    for link in cell.links:
        node = cell.nodes[link.id]
        cfg = agent_config(topo, link, run_id, creds.for_device(link.id), SERVER_ADDRESS, MQTT_PORT,
                           node.cpu_quota_cores or float(os.cpu_count() or 1), max_message_bytes)
        cfg.write(agents / f"{link.id}.json")
        hand_to(agents / f"{link.id}.json", uids[link.id])
    return uids


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


# -- the launcher ------------------------------------------------------------------------

class AgentLauncher:
    """Agents of one cell, started by this process through its template.

    A device's agent reads `<state dir>/agents/<device>.json` (written by the run owner
    with `agent_config`, owned by the device's uid). `start()` may begin before the cell
    exists, so that the template's imports overlap the cell's creation; `bind(cell, uids)`
    (the devices' uids, node_uids.py) comes before spawning.
    """

    def __init__(self, run_id: str, state_dir: Path, logs_dir: Path, preload: list[tuple[str, str]] | None = None,
                 *, forked_template: int | None = None):
        self.run_id = run_id
        self.preload = list(preload or [])  # (model, precision) variants the template makes before forking
        self.state_dir, self.logs_dir = Path(state_dir), Path(logs_dir)
        self.sock_path = self.state_dir / "agent-template.sock"
        self.template_pid: int | None = forked_template  # forked by this process (worker.py): not spawned here
        self._template: Any = None
        self._ready: asyncio.Future | None = None
        self._pids: dict[str, int] = {}
        self._spawning: dict[str, asyncio.Future] = {}  # device -> its start in flight (one agent per device)
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
        log = self.logs_dir / "agent-template.log"
        if self.template_pid is None:
            self.sock_path.unlink(missing_ok=True)
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            env = {PRELOAD_ENV: ",".join(f"{m}:{p}" for m, p in self.preload)}
            proc = await asyncio.to_thread(spawn_in, None, [sys.executable, "-m", "testbed.composition.template",
                                                            str(self.sock_path)], env, log)
            self._template, self.template_pid = proc, proc.pid
        while not await asyncio.to_thread(self._accepts):
            if (code := self._template_exit()) is not None:
                raise ResourceError(f"the agent template exited with code {code}; see {log}")
            if time.monotonic() - t0 > timeout_s:
                raise ResourceError(f"the agent template did not start within {timeout_s:g} s; see {log}")
            await asyncio.sleep(0.05)
        return time.monotonic() - t0

    def _template_exit(self) -> int | None:
        """The template's exit code once it has exited (spawned or forked by this process)."""
        if self._template is not None:
            return self._template.poll()
        if self.template_pid is None:
            return None
        try:
            pid, status = os.waitpid(self.template_pid, os.WNOHANG)
        except ChildProcessError:
            return -1
        return os.waitstatus_to_exitcode(status) if pid else None

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
        # the node's own environment first (its GPU share's CUDA MPS variables, emulation/gpu.py)
        env = {**join.env, "TESTBED_AGENT_CONFIG": str(cfg), "OMP_NUM_THREADS": str(max(1, int(cores)))}
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
        """Start the agents of `devices` that are neither running nor starting (not killed
        ones): a warm-up and a generation asking at once start each agent once."""
        from testbed.emulation.procs import pid_alive

        assert self.cell is not None
        for d in devices:
            if self.cell.nodes[d].state == "killed" or d in self._spawning or (d in self._pids and
                                                                                pid_alive(self._pids[d])):
                continue
            fut = self._spawning[d] = asyncio.ensure_future(self.spawn(d))
            fut.add_done_callback(lambda f, d=d: self._spawning.pop(d, None) if self._spawning.get(d) is f else None)
        waits = [self._spawning[d] for d in devices if d in self._spawning]
        if waits:
            await asyncio.gather(*(asyncio.shield(w) for w in waits))

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

        for fut in list(self._spawning.values()):
            fut.cancel()
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


class ExternalAgents:
    """Agents that someone else starts (compose/Swarm device services)."""

    async def ensure(self, devices: list[str]) -> None:
        """They start with their containers; the orchestrator waits for them online."""

    async def revive(self, device: str) -> int:
        raise ResourceError(f"revive {device}: in a compose/Swarm deployment restart its container (`docker start`)")

    def pids(self) -> dict[str, int]:
        return {}

    async def close(self) -> None:
        """Nothing to stop: they are the deployment's."""
