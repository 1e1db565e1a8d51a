"""The per-cell supervisor behind `testbed up`: a detached run owner that keeps one cell alive.

`testbed up` starts `python -m testbed.composition.supervisor RUN FILE [--seed N]
[--backend B] [--no-broker]` in its own session. The supervisor opens a `RunSession` on
the cell (namespaces or containers, shaped links, limits, the secured broker, the agent
template, one warm agent per device, the edge server's model and the MS-SSIM reference),
serves the cell and its agents on the control socket (`/run/testbed/<run>/control.sock`:
`testbed run --run ID`, `testbed fault`, the TUI ask it), runs generations there (the
streaming op `generate`: `testbed run --run ID` sends its scenario and follows the
events, without importing torch), keeps `state.json` current (each node's state, whether
its agent is online) and tears everything down on SIGTERM/SIGINT (what `testbed down`
sends) or on a crash. It writes supervisor.pid first, then state.json (ready) or
error.json.
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
from typing import Any

from pathlib import Path

from testbed.composition.cells import cell_source
from testbed.composition.session import RunSession
from testbed.composition.startup import StartupClock
from testbed.emulation.attached import cell_handlers, control_path
from testbed.emulation.control import ControlServer
from testbed.emulation.runs import run_dir, write_state, write_topology
from testbed.errors import InputError, ResourceError, TestbedError
from testbed.model.topology import load_topology, parse_topology

__all__ = ["main"]


class CellKeeper:
    """The supervisor's state: the session, what its agents report, and state.json."""

    def __init__(self, session: RunSession, base: dict[str, Any]):
        self.session = session
        self.base = base
        self.online: dict[str, bool] = {}
        self._last_write = 0.0
        self._generating = asyncio.Lock()

    def write(self, *_: Any) -> None:
        cell = self.session.cell
        assert cell is not None
        doc = cell.status()
        for node in doc["nodes"]:
            if node["role"] == "device":
                node["agent_online"] = self.online.get(node["id"], False)
        write_state(self.session.run_id or "", self.base | doc)
        self._last_write = time.monotonic()

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

    async def generate(self, emit: Any, *, topology: dict[str, Any], method: str = "multistage",
                       selector: str | None = None, t_max_s: float | None = None, e_max_j: float | None = None,
                       fail: str | None = None, out_dir: str | None = None,
                       started_at: float | None = None) -> dict[str, Any]:
        """The streaming op `generate`: one generation of the caller's scenario (`topology`, a
        topology document) on this cell, its events sent to the caller as they happen; the
        result document. One at a time: a second caller is told so."""
        received = time.time()
        if self._generating.locked():
            raise ResourceError(f"run {self.session.run_id} is running a generation; "
                                "ask again when it has finished (one generation at a time per cell)")
        self.session.require_broker()
        if out_dir is not None and not Path(out_dir).is_absolute():
            raise InputError(f"generate: out_dir {out_dir!r} must be an absolute path")
        async with self._generating:
            topo = parse_topology(json.dumps(topology), source="the topology of `testbed run --run`")
            clock = StartupClock(started_at if started_at is not None else received, path="warm")
            clock.mark("cli", clock.t0, received)  # the client: its interpreter, imports and request
            self.session.events.listeners.append(emit)
            try:
                res = await self.session.run(method, selector=selector, t_max_s=t_max_s, e_max_j=e_max_j, fail=fail,
                                             out_dir=Path(out_dir) if out_dir else None, topology=topo,
                                             startup=clock)
            finally:
                self.session.events.listeners.remove(emit)
                self.write()
            return res.doc

    async def watch_agents(self) -> None:
        """Follow the devices' retained MQTT status (online/offline) for `agent_online`."""
        import aiomqtt

        from testbed.relay import topics
        from testbed.relay.messages import BadMessage, parse_status

        session = self.session
        loop = asyncio.get_running_loop()

        def seen(dev: str, state: str) -> None:
            self.online[dev] = state in ("online", "computing")
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
                                state = parse_status(parsed[0], bytes(m.payload)).state
                                loop.call_soon_threadsafe(seen, parsed[0], state)
                except aiomqtt.MqttError:
                    await asyncio.sleep(1.0)  # the broker restarts (a fault): follow it again

        await session.in_server_ns(follow)


async def _main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    topo = load_topology(args.file, seed=args.seed)
    t0 = time.perf_counter()
    write_topology(args.run, topo)
    source = cell_source(args.run, backend=args.backend, cluster=args.cluster, broker=args.broker,
                         state_dir=run_dir(args.run))
    async with RunSession(topo, source) as session:
        cell = session.cell
        assert cell is not None
        keeper = CellKeeper(session, {"ready": False, "topology": os.path.abspath(args.file), "seed": topo.seed,
                                      "supervisor_pid": os.getpid()})
        control = ControlServer(control_path(args.run), keeper.handlers(), streams={"generate": keeper.generate})
        await control.start()
        watcher = None
        try:
            if args.broker:  # warm agents: `testbed run --run ID` finds them online
                watcher = asyncio.ensure_future(keeper.watch_agents())
                await session.ensure_agents(cell.device_ids())
            keeper.base |= {"ready": True, "up_s": round(time.perf_counter() - t0, 3),
                            "timings_s": {k: round(v, 4) for k, v in session.timings_s.items()}}
            keeper.write()
            cell.on_update(keeper.on_mobility)
            await stop.wait()
        finally:
            await control.close()
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(BaseException):
                    await watcher
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="testbed-supervisor")
    ap.add_argument("run")
    ap.add_argument("file")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--backend", default="netns")
    ap.add_argument("--cluster", default=None)  # --backend swarm: the cluster's name
    ap.add_argument("--no-broker", dest="broker", action="store_false")
    args = ap.parse_args(argv)
    (run_dir(args.run) / "supervisor.pid").write_text(str(os.getpid()))
    try:
        return asyncio.run(_main(args))
    except TestbedError as e:
        write_state(args.run, {"error": str(e), "exit_code": e.exit_code}, "error.json")
        return e.exit_code
    except BaseException as e:  # noqa: BLE001 - a crash is reported to `up`, never silent
        write_state(args.run, {"error": f"{type(e).__name__}: {e}", "exit_code": 5,
                               "traceback": traceback.format_exc()}, "error.json")
        return 5


if __name__ == "__main__":
    sys.exit(main())
