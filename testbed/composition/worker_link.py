"""The cell owner's side of its worker (worker.py): start it, wait for it, ask it, stop it.

A cell's owner — the `testbed up` supervisor, or `testbed run`'s own process on a cold run —
never imports torch: its worker does, once, for the agent template (forked from it) and the
edge server's model. The owner starts the worker before it makes the cell, so that the
worker's imports overlap the namespaces, links and broker; it serves the cell on the control
socket for it and reaches it on `<state dir>/worker.sock`. `WorkerAgents` is the run's
`Agents` through the worker, and `generate` streams one generation's events from it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.composition.worker_start import adopt, worker_argv, worker_environ
from testbed.emulation.control import call, call_stream
from testbed.emulation.runs import read_state, run_dir
from testbed.errors import ResourceError

__all__ = ["WorkerAgents", "worker_path", "worker_environ", "write_worker_topology", "read_worker_topology",
           "WORKER_STATE"]

WORKER_STATE = "worker.json"  # what the worker has warm, written by the worker in the run's state directory


def worker_path(run_id: str) -> Path:
    return run_dir(run_id) / "worker.sock"


def write_worker_topology(run_id: str, topo: Any) -> None:
    """The scenario as the file said it (seed applied): what the worker loads. (The resolved
    topology.yaml, with every default written out, does not load back for every file.)"""
    path = run_dir(run_id) / "worker-topology.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(topo.model_dump(mode="json", exclude_unset=True), f)


def read_worker_topology(run_id: str) -> Any:
    from testbed.model.topology import parse_topology

    path = run_dir(run_id) / "worker-topology.json"
    return parse_topology(path.read_text(), source=str(path))


class WorkerAgents:
    """The run's agents, forked by its worker's template; also the way to the worker."""

    def __init__(self, run_id: str, proc: subprocess.Popen):
        self.run_id = run_id
        self.proc = proc
        self.path = worker_path(run_id)
        self.log = run_dir(run_id) / "logs" / "worker.log"
        self._ready = False

    @classmethod
    def spawn(cls, run_id: str, *, warm: str = "auto", remote_agents: bool = False,
              variants: list[tuple[str, str]] | None = None) -> WorkerAgents:
        """Start the worker (`warm`: the agents it keeps warm, worker.py; `remote_agents`: they
        are its owner's, a Swarm cell's keepers'; `variants`: its template's, cells.preloaded_variants,
        which lets a cold run's prestarted worker (worker_start.py) take the run). Call it from the thread that owns the run:
        the worker dies with that thread (PR_SET_PDEATHSIG)."""
        logs = run_dir(run_id) / "logs"
        logs.mkdir(mode=0o700, exist_ok=True)
        adopted = None if variants is None else adopt(run_id, run_dir(run_id), warm, remote_agents, variants)  # a cold run's
        if adopted is not None:
            return cls(run_id, adopted)
        fd = os.open(logs / "worker.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            argv = worker_argv(run_id, "--warm", warm)
            proc = subprocess.Popen(argv + (["--remote-agents"] if remote_agents else []),
                                    stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True, env=worker_environ())
        finally:
            os.close(fd)
        return cls(run_id, proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def failure(self) -> str | None:
        """Why the worker is gone (its exit code and its log's last line), or None while it runs."""
        if self.proc.poll() is None:
            return None
        doc = read_state(self.run_id, WORKER_STATE) or {}
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()] \
            if self.log.exists() else []
        why = doc.get("error") or (lines[-1] if lines else "no output")
        return f"the run's worker exited with code {self.proc.returncode}: {why} (log: {self.log})"

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            return s.connect_ex(str(self.path)) == 0

    async def ready(self, timeout_s: float = 300.0) -> None:
        """Until the worker serves its socket (its imports, template and attachment done)."""
        t0 = time.monotonic()
        while not self._ready:
            if (why := self.failure()) is not None:
                raise ResourceError(why)
            if self.path.exists() and await asyncio.to_thread(self._accepts):
                self._ready = True
                return
            if time.monotonic() - t0 > timeout_s:
                raise ResourceError(f"the run's worker did not start within {timeout_s:g} s; see {self.log}")
            await asyncio.sleep(0.02)

    def _gone(self, e: ResourceError) -> ResourceError:
        why = self.failure()
        return ResourceError(why) if why is not None else e

    async def _call(self, op: str, **args: Any) -> Any:
        await self.ready()
        try:
            return await call(self.path, op, **args)
        except ResourceError as e:
            raise self._gone(e) from None

    # -- Agents ---------------------------------------------------------------------------
    async def ensure(self, devices: list[str]) -> None:
        await self._call("agents_ensure", devices=list(devices))

    async def revive(self, device: str) -> int:
        return int(await self._call("agents_revive", device=device))

    def pids(self) -> dict[str, int]:
        """The agents' pids as the worker last published them (worker.json, rewritten whenever
        it starts or revives one). Not a call: the owner's loop must never block on the
        worker, whose generation may be waiting on the owner at that moment (a deadlock)."""
        state = self.state() or {}
        return {d: int(p) for d, p in (state.get("agents") or {}).items()}

    async def generate(self, on_event: Callable[[dict[str, Any]], None], **args: Any) -> dict[str, Any]:
        """One generation in the worker (its op `generate`); its events to `on_event` as they come."""
        await self.ready()
        try:
            return await call_stream(self.path, "generate", on_event, **args)
        except ResourceError as e:
            raise self._gone(e) from None

    def state(self) -> dict[str, Any] | None:
        """The worker's worker.json: what it has warm."""
        return read_state(self.run_id, WORKER_STATE)

    async def close(self, timeout_s: float = 20.0) -> None:
        """Stop the worker: it stops its agents and its template, then exits (SIGKILL after
        `timeout_s`; the cell's teardown ends whatever is left in the nodes)."""
        from testbed.emulation.procs import stop_pid

        if self.proc.poll() is None:
            await stop_pid(self.proc.pid, timeout_s=timeout_s)
        self.proc.poll()
