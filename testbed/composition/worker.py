"""A cell's worker: the one process that imports torch and diffusers, forks the agent template
from itself, holds the edge server's model and runs the generations on the cell.

    python -m testbed.composition.worker RUN [--warm auto|all|none|N|dev01,dev02] [--remote-agents]

The cell's owner (`testbed up`'s supervisor, or `testbed run`'s own process on a cold run;
worker_link.py) starts it with the allow-listed environment before it makes the cell. While
the owner makes namespaces, links and the broker, this process imports torch and diffusers
(seconds of CPU), forks the agent template — which makes the model variants and forks the
agents — and loads the server's model: the imports are paid once, not once for the template
and once for the server. It then attaches to the cell through the owner's control socket and
reads the run's credentials (after the fork: the template never holds them), keeps warm the
agents `--warm` names (online.warm_set) and serves `<state dir>/worker.sock`:

| op | what |
| --- | --- |
| `generate` (streaming) | one generation of a caller's scenario (a topology document) on the cell: its events as they happen, then the result document |
| `agents_ensure`, `agents_revive`, `agents_pids` | the run's agents (the owner's `WorkerAgents`) |

It keeps `worker.json` in the run's state directory current (its pids, what is warm, where
its start-up time went) and ends on SIGTERM — its agents and template with it — or when its
owner dies.

`--remote-agents` (a Swarm cell, swarm_cells.py): the agents are not this host's — each
device's keeper starts its own on its node — so the worker forks no template and drives
them through its owner's control socket (`RemoteAgents`); it still holds the server's
model and runs the generations.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# Light imports only: a cold run's worker forks its agent template as soon as torch and
# diffusers are in; the cell's modules (runs, worker_link, cells: pydantic, numpy, pyroute2)
# are imported after the fork, beside the template's own work.
from testbed.composition.startup import StartupClock, command_started_at
from testbed.emulation.procs import die_with_parent
from testbed.errors import InputError, ResourceError, TestbedError

__all__ = ["main", "Worker"]


class Worker:
    """The worker's ops on its session (a `RunSession` on the attached cell)."""

    def __init__(self, session: Any, warm: list[str]):
        self.session = session
        self.warm = warm
        self._generating = asyncio.Lock()
        self._warming: asyncio.Future | None = None
        self.error: str | None = None

    def handlers(self) -> dict[str, Any]:
        session = self.session

        async def agents_ensure(devices: list[str]) -> None:
            await session.agents.ensure(list(devices))
            self.publish()

        async def agents_revive(device: str) -> int:
            pid = await session.agents.revive(device)
            self.publish()
            return pid

        async def agents_pids() -> dict[str, int]:
            return session.agents.pids()

        return {"agents_ensure": agents_ensure, "agents_revive": agents_revive, "agents_pids": agents_pids}

    def start_warming(self) -> None:
        """The `--warm` agents start now, in the background (the `agents` phase)."""
        if self.warm:
            self._warming = asyncio.ensure_future(self.session.warm_agents(self.warm))
            self._warming.add_done_callback(self._warmed)

    def _warmed(self, fut: asyncio.Future) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self.error = f"warming the agents failed: {fut.exception()}"
            print(self.error, flush=True)
        self.publish()

    def publish(self) -> None:
        """worker.json: what is warm (the owner's `testbed status` and `up --wait` read it)."""
        from testbed.composition.worker_link import WORKER_STATE
        from testbed.emulation.runs import write_state

        s = self.session
        warmed = self._warming is not None and self._warming.done() and self.error is None
        write_state(s.run_id, {"pid": os.getpid(), "template_pid": s.template_pid, "ready": True,
                               "warm": self.warm, "warm_done": warmed or not self.warm, "error": self.error,
                               "agents": s.agents.pids(), "startup": s.clock.to_json()}, WORKER_STATE)

    async def generate(self, emit: Any, *, topology: dict[str, Any], method: str = "multistage",
                       selector: str | None = None, t_max_s: float | None = None, e_max_j: float | None = None,
                       fail: str | None = None, out_dir: str | None = None, started_at: float | None = None,
                       startup_path: str = "warm", phases: dict[str, list[float]] | None = None,
                       confidence: float | None = None) -> dict[str, Any]:
        """The streaming op `generate`: one generation of the caller's scenario (`topology`, a
        topology document) on this cell, its events sent to the caller as they happen; the
        result document. `phases`: the caller's own start-up phases (epoch [start, end]), a
        cold run's cli, cell and broker. One at a time: a second caller is told so."""
        from testbed.model.topology import parse_topology

        received = time.time()
        if self._generating.locked():
            raise ResourceError(f"run {self.session.run_id} is running a generation; "
                                "ask again when it has finished (one generation at a time per cell)")
        self.session.require_broker()
        if out_dir is not None and not Path(out_dir).is_absolute():
            raise InputError(f"generate: out_dir {out_dir!r} must be an absolute path")
        async with self._generating:
            topo = parse_topology(json.dumps(topology), source="the topology of `testbed run`")
            clock = StartupClock(started_at if started_at is not None else received, path=startup_path)
            if phases:
                for name, (a, b) in phases.items():
                    clock.mark(name, float(a), float(b))
            else:
                clock.mark("cli", clock.t0, received)  # the client: its interpreter, imports and request
            if startup_path == "cold":
                clock.include(self.session.clock)  # this worker's start-up was the command's: template, model
            self.session.events.listeners.append(emit)
            try:
                res = await self.session.run(method, selector=selector, t_max_s=t_max_s, e_max_j=e_max_j, fail=fail,
                                             out_dir=Path(out_dir) if out_dir else None, topology=topo,
                                             confidence=confidence,
                                             startup=clock)
            finally:
                self.session.events.listeners.remove(emit)
                self.publish()
            return res.doc


async def _serve(run_id: str, topo: Any, template_pid: int | None, warm_spec: str, t_start: float,
                 t_imported: float) -> int:
    from testbed.composition.agents import AgentLauncher
    from testbed.composition.cells import WorkerCell
    from testbed.composition.online import warm_set
    from testbed.composition.session import RunSession
    from testbed.composition.worker_link import worker_path
    from testbed.emulation.control import ControlServer
    from testbed.emulation.runs import run_dir

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _print_tasks)  # `kill -USR1 PID`: what it waits on, in worker.log
    state = run_dir(run_id)
    launcher = None if template_pid is None else AgentLauncher(run_id, state, state / "logs",
                                                               forked_template=template_pid)
    session = RunSession(topo, WorkerCell(run_id, launcher), started_at=t_start)
    session.clock.mark("imports", t_start, t_imported)  # interpreter, torch, diffusers, the handlers: once
    if launcher is not None:
        launcher.start().add_done_callback(lambda fut: None if fut.cancelled() or fut.exception() else
                                           session.clock.mark("template", t_start, time.time()))
    async with session:
        session.clock.phases.pop("cli", None)  # (before the session: the imports, not a command line)
        worker = Worker(session, warm_set(warm_spec, session.cell.device_ids()))
        server = ControlServer(worker_path(run_id), worker.handlers(), streams={"generate": worker.generate})
        await server.start()
        try:
            worker.start_warming()
            worker.publish()
            await stop.wait()
        finally:
            await server.close()
    return 0


def _print_tasks() -> None:
    """Every pending task of this worker's loop with its stack (a generation that waits)."""
    tasks = asyncio.all_tasks()
    print(f"--- {len(tasks)} tasks", flush=True)
    for task in tasks:
        task.print_stack(limit=15, file=sys.stdout)
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="testbed-worker")
    ap.add_argument("run", nargs="?")
    ap.add_argument("--warm", default="auto")
    ap.add_argument("--remote-agents", action="store_true")  # its owner's (a Swarm cell's keepers): no template
    ap.add_argument("--prestarted", action="store_true")  # a cold run's: imports first, then its run on stdin
    args = ap.parse_args(argv)
    t_start = command_started_at()
    die_with_parent(os.getppid(), signal.SIGTERM)  # its owner (the cell) gone, nothing is left to work on
    from setproctitle import setproctitle

    if args.run is None and not args.prestarted:
        ap.error("RUN is required (or --prestarted)")
    state = None
    if args.prestarted:
        setproctitle("testbed-worker (prestarted)")
    else:
        from testbed.emulation.runs import run_dir

        state = run_dir(args.run)
        setproctitle(f"testbed-worker {args.run} {state}/")  # (`testbed down` finds a crashed run's by it)
    try:
        from testbed.composition.template import fork_template, import_agent_code

        import_agent_code()  # single-threaded here, with no secret in memory: the template forks from this
        t_imported = time.time()
        variants = None
        if args.prestarted:  # a cold run's command line made the cell meanwhile (worker_start.py)
            line = sys.stdin.readline()
            if not line:
                return 0  # the command ended (bad input, --help) before it made a cell
            told = json.loads(line)
            args.run, args.warm, args.remote_agents = told["run"], told["warm"], told["remote_agents"]
            state, variants = Path(told["state_dir"]), [tuple(v) for v in told["variants"]]
            _log_to(state / "logs" / "worker.log")
            setproctitle(f"testbed-worker {args.run} {state}/")
        fork = None if args.remote_agents else lambda variants: fork_template(
            state / "agent-template.sock", variants, state / "logs" / "agent-template.log")
        template_pid = fork(variants) if fork and variants is not None else None
        from testbed.composition.cells import preloaded_variants
        from testbed.composition.worker_link import read_worker_topology
        from testbed.model.radio import compute_links
        from testbed.model.topology import place

        topo = read_worker_topology(args.run)
        if fork and template_pid is None:
            template_pid = fork(preloaded_variants(topo, compute_links(topo, place(topo))))
        return asyncio.run(_serve(args.run, topo, template_pid, args.warm, t_start, t_imported))
    except TestbedError as e:
        print(f"error: {e}", flush=True)
        if args.run is not None:
            _write_failure(args.run, {"error": str(e), "exit_code": e.exit_code})
        return e.exit_code
    except BaseException as e:  # noqa: BLE001 - reported to the owner, never silent
        traceback.print_exc()
        with contextlib.suppress(Exception):
            _write_failure(args.run, {"error": f"{type(e).__name__}: {e}", "exit_code": 5})
        return 5


def _write_failure(run_id: str, doc: dict[str, Any]) -> None:
    from testbed.composition.worker_link import WORKER_STATE
    from testbed.emulation.runs import write_state

    write_state(run_id, doc, WORKER_STATE)


def _log_to(path: Path) -> None:
    """stdout and stderr to the run's worker log from now on (a prestarted worker's were null)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # without the interpreter's teardown of torch (seconds)
