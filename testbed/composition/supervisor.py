"""The per-cell supervisor behind `testbed up`: a detached process that keeps one cell alive.

`testbed up` starts `python -m testbed.composition.supervisor RUN FILE [--seed N]
[--backend B] [--no-broker] [--warm SPEC]` in its own session. The supervisor makes the
cell (namespaces or containers, shaped links, limits, the secured broker, the agents'
configs) and says so in state.json (`ready`): `up` returns then, while the cell's worker
(worker.py, started first so that its torch imports overlap the cell's creation) forks the
agent template, loads the edge server's model and warms the agents `--warm` names
(online.warm_set) in the background. The supervisor itself never imports torch. It serves
the cell on the control socket (`/run/testbed/<run>/control.sock`: the worker, `testbed
fault`, the TUI and `testbed run --run ID` ask it), hands the streaming op `generate` and
the agents' ops to the worker, keeps `state.json` current (each node's state, whether its
agent is online, the warm set) and tears everything down on SIGTERM/SIGINT (what `testbed
down` sends) or on a crash. It writes supervisor.pid first, then state.json (ready) or
error.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
import traceback
from typing import Any

from testbed.composition.cells import CellSource, MadeCell
from testbed.composition.online import Liveness, warm_set
from testbed.composition.session import RunSession
from testbed.emulation.attached import cell_handlers, control_path
from testbed.emulation.control import ControlServer
from testbed.emulation.runs import run_dir, write_state, write_topology
from testbed.errors import InputError, RunFailedError, TestbedError
from testbed.model.topology import load_topology

__all__ = ["main", "cell_source"]


class CellKeeper:
    """The supervisor's state: the session, what its agents report, and state.json — each
    device node's `agent`: online, down (silent for SILENT_AFTER_S while its process runs:
    stopped, hung; plans leave it out) or offline."""

    def __init__(self, session: RunSession, base: dict[str, Any]):
        self.session = session
        self.base = base
        self.liveness = Liveness()  # the agents' statuses and heartbeats (watch_agents)
        self._agents_written: dict[str, str] = {}
        self._last_write = 0.0
        self._write_pending: asyncio.Handle | None = None

    def write(self, *_: Any) -> None:
        cell = self.session.cell
        assert cell is not None
        doc = cell.status()
        agents = self.agent_states()
        for node in doc["nodes"]:
            if node["role"] == "device":
                node["agent"] = agents.get(node["id"], "offline")  # online | down (silent, still running) | offline
                node["agent_online"] = node["agent"] == "online"
                silent_s = self.liveness.silent_s(node["id"])
                node["agent_heard_s_ago"] = round(silent_s, 1) if silent_s is not None else None
        write_state(self.session.run_id or "", self.base | doc)
        self._agents_written = agents
        self._last_write = time.monotonic()

    def agent_states(self) -> dict[str, str]:
        """Each device's agent: online, down or offline (online.Liveness)."""
        cell, agents = self.session.cell, self.session.agents
        running = agents.pids() if agents is not None else {}
        return {d: self.liveness.state(d, d in running) for d in cell.device_ids()} if cell is not None else {}

    def write_soon(self, delay_s: float = 0.2) -> None:
        """One state.json for a burst of changes (200 agents coming online): each write is
        the whole cell's status, so writing per change would grow with the square of the devices."""
        if self._write_pending is None:
            def flush() -> None:
                self._write_pending = None
                if self.session.cell is not None:  # (not once the cell is being torn down)
                    self.write()

            self._write_pending = asyncio.get_running_loop().call_later(delay_s, flush)

    def on_mobility(self, _update: Any) -> None:  # at most once a second
        if time.monotonic() - self._last_write >= 1.0:
            self.write()

    def handlers(self) -> dict[str, Any]:
        """The cell's control ops, each followed by a fresh state.json, and the agents' ops."""
        session = self.session
        assert session.cell is not None

        def then_write(fn: Any) -> Any:
            async def handler(**kw: Any) -> Any:
                try:
                    return await fn(**kw)
                finally:
                    self.write()

            return handler

        ops = {name: then_write(fn) for name, fn in cell_handlers(session.cell).items()}

        async def agents_ensure(devices: list[str]) -> None:
            await session.ensure_agents(list(devices))

        async def agents_revive(device: str) -> int:
            return await session.revive(device)

        async def agents_pids() -> dict[str, int]:
            return session.agents.pids() if session.agents is not None else {}

        ops.update({"agents_ensure": then_write(agents_ensure), "agents_revive": then_write(agents_revive),
                    "agents_pids": agents_pids})
        return ops

    async def generate(self, emit: Any, **args: Any) -> dict[str, Any]:
        """The streaming op `generate` (`testbed run --run ID`): handed to the cell's worker,
        which holds the server's model and the agents (worker.py); its events stream back."""
        self.session.require_broker()
        worker = self.session.need_rig().worker
        if worker is None:
            raise RunFailedError(f"run {self.session.run_id} has no worker to run generations")
        try:
            return await worker.generate(emit, **args)
        finally:
            self.write()

    async def follow_worker(self) -> None:
        """Note in state.json when the worker is serving, and why it went if it dies."""
        worker = self.session.need_rig().worker
        if worker is None:
            return
        try:
            await worker.ready()
            self.base["worker"] = "ready"
        except TestbedError as e:
            self.base["worker"] = f"failed: {e}"
        self.write()
        while (why := worker.failure()) is None:
            await asyncio.sleep(1.0)
        self.base["worker"] = f"failed: {why}"
        self.write()

    async def watch_agents(self, tick_s: float = 1.0) -> None:
        """Follow the devices' statuses (retained online/offline, heartbeats, computing) for
        each node's `agent`; a device silent for SILENT_AFTER_S turns `down` at the next tick."""
        import aiomqtt

        from testbed.relay import topics
        from testbed.relay.messages import BadMessage, parse_status

        session = self.session
        loop = asyncio.get_running_loop()

        def seen(dev: str, state: str, age_s: float) -> None:
            self.liveness.heard(dev, state, time.monotonic() - age_s)
            if self.agent_states() != self._agents_written or state == "offline":
                self.write_soon()

        async def tick() -> None:
            while True:
                await asyncio.sleep(tick_s)
                if self.agent_states() != self._agents_written:
                    self.write()

        async def follow() -> None:
            rs = session.relay_settings("monitor")  # the watch listener: read-only, its own client id
            while True:
                try:
                    async with aiomqtt.Client(rs.broker_host, rs.broker_port, username=rs.username,
                                              password=rs.password, identifier=f"tb-{rs.run}-keeper",
                                              keepalive=10, timeout=10) as client:
                        await client.subscribe(topics.device_leaf_filter(rs.run, "status"), qos=1)
                        async for m in client.messages:
                            parsed = topics.parse_device_topic(rs.run, str(m.topic))
                            if parsed is None or parsed[1] != "status":
                                continue
                            with contextlib.suppress(BadMessage):  # a malformed status changes nothing
                                st = parse_status(parsed[0], bytes(m.payload))
                                # a retained status is as old as its heartbeat says (an agent that stopped beating)
                                age_s = max(0.0, time.time() - st.ts) if m.retain and st.ts is not None else 0.0
                                loop.call_soon_threadsafe(seen, parsed[0], st.state, age_s)
                except aiomqtt.MqttError:
                    await asyncio.sleep(1.0)  # the broker restarts (a fault): follow it again

        await asyncio.gather(session.in_server_ns(follow), tick())


def cell_source(run_id: str | None = None, *, backend: str = "netns", cluster: str | None = None, broker: bool = True,
                state_dir: Any = None, worker: bool = False, warm: str = "auto") -> CellSource:
    """The cell source that makes a cell on `backend`: a `MadeCell` (netns, docker), or for
    `swarm` the cluster's `SwarmCell` (swarm_cells.py). `worker`: the generations run in a
    worker process (worker.py) that this one serves the cell to."""
    if backend == "swarm":
        if not cluster:
            raise InputError("--backend swarm needs --cluster NAME (`testbed cluster up --nodes N --name NAME`)")
        from testbed.composition.swarm_cells import SwarmCell  # (docker, the cluster's code: only here)

        return SwarmCell(run_id, cluster=cluster, broker=broker, state_dir=state_dir, worker=worker)
    if cluster:
        raise InputError(f"--cluster {cluster}: a cluster goes with --backend swarm (not {backend})")
    return MadeCell(run_id, backend=backend, broker=broker, state_dir=state_dir, worker=worker, warm=warm)


async def _main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task, ready = asyncio.current_task(), False

    def stop_on(sig: int) -> None:  # (the start-up is cancelled: the session tears down what it made)
        args.stopped_by = args.stopped_by or sig
        stop.set()
        if not ready and main_task is not None:
            main_task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop_on, sig)
    topo = load_topology(args.file, seed=args.seed)
    t0 = time.perf_counter()
    write_topology(args.run, topo)
    source = cell_source(args.run, backend=args.backend, cluster=args.cluster, broker=args.broker,
                         state_dir=run_dir(args.run), worker=True, warm=args.warm)
    async with RunSession(topo, source) as session:
        cell = session.cell
        assert cell is not None
        keeper = CellKeeper(session, {"ready": False, "topology": os.path.abspath(args.file), "seed": topo.seed,
                                      "supervisor_pid": os.getpid(), "worker": "starting" if args.broker else None,
                                      "warm": warm_set(args.warm, cell.device_ids()) if args.broker else []})
        control = source.control  # serving the cell to the worker already
        if control is None:
            control = ControlServer(control_path(args.run), cell_handlers(cell))
            await control.start()
        control.add(keeper.handlers())
        control.streams["generate"] = keeper.generate
        tasks: list[asyncio.Future] = []
        try:
            if args.broker:  # the worker warms the agents; `testbed status` shows them coming online
                tasks = [asyncio.ensure_future(keeper.watch_agents()), asyncio.ensure_future(keeper.follow_worker())]
            keeper.base |= {"ready": True, "up_s": round(time.perf_counter() - t0, 3),
                            "timings_s": {k: round(v, 4) for k, v in session.timings_s.items()}}
            keeper.write()
            cell.on_update(keeper.on_mobility)
            ready = True
            await stop.wait()
        finally:
            await control.close()
            for task in tasks:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="testbed-supervisor")
    ap.add_argument("run")
    ap.add_argument("file")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--backend", default="netns")
    ap.add_argument("--cluster", default=None)  # --backend swarm: the cluster's name
    ap.add_argument("--no-broker", dest="broker", action="store_false")
    ap.add_argument("--warm", default="auto")
    args = ap.parse_args(argv)
    args.stopped_by = None
    (run_dir(args.run) / "supervisor.pid").write_text(str(os.getpid()))
    try:
        asyncio.run(_main(args))
        return _stopped(args) if args.stopped_by else 0
    except asyncio.CancelledError:
        if not args.stopped_by:
            raise
        return _stopped(args)
    except TestbedError as e:
        write_state(args.run, {"error": str(e), "exit_code": e.exit_code}, "error.json")
        return e.exit_code
    except BaseException as e:  # noqa: BLE001 - a crash is reported to `up`, never silent
        write_state(args.run, {"error": f"{type(e).__name__}: {e}", "exit_code": 5,
                               "traceback": traceback.format_exc()}, "error.json")
        return 5


def _stopped(args: argparse.Namespace) -> int:
    """Stopped by a signal (SIGTERM from `testbed down`, SIGHUP, SIGINT), the cell torn down:
    its run directory goes too (`testbed down` then finds nothing more); 128 + the signal."""
    from testbed.emulation.owned_dirs import remove_owned_dir
    from testbed.model.names import STATE_ROOT

    with contextlib.suppress(Exception):  # `testbed down` removes what is left
        remove_owned_dir(run_dir(args.run), STATE_ROOT)
    return 128 + int(args.stopped_by)


if __name__ == "__main__":
    sys.exit(main())
