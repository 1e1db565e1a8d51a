"""`RunSession`: the run owner — a cell from a source, generations on it, their outputs.

    async with RunSession(topo, MadeCell(backend="netns"), out_dir=out) as session:
        result = await session.run("multistage", selector="dp")   # or a Collaboration object
        other = await session.run("split", t_max_s=4)             # same cell, other budgets

It is three parts held together:

- a **cell source** (cells.py) supplies the cell, the run's credentials, the agents, the
  energy history and the state directory — made here (`MadeCell`, the default), attached
  to a `testbed up` cell (`AttachedCellSource`) or given by a deployment (`GivenCell`);
- a **generation** (generation.py) plans, executes and scores one request on that cell;
- the **outputs** (results.py): result.json, events.jsonl, image.png, logs/.

The session itself is what the methods borrow (`RunServices`, methods/base.py): the broker
login, agents online, the server's model, the devices' powers, the event log, the edge
server's namespace. `testbed run`, `testbed sweep`, the TUI, a deployment's server and the
`testbed up` supervisor all go through it. What the source made is torn down on exit, on
errors and Ctrl-C too. Where the start-up time went is the result's `meta.startup`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.composition.cells import CellSource, MadeCell, Rig, max_message_bytes, same_cell
from testbed.composition.events import EventLog
from testbed.composition.generation import Generation, Request
from testbed.composition.online import MAX_SPARE_AGENTS, ensure_online, warm_set
from testbed.composition.results import RunResult
from testbed.composition.server_side import ServerSide
from testbed.composition.startup import StartupClock
from testbed.errors import InputError, RunFailedError, TopologyError
from testbed.methods import method as method_spec
from testbed.methods.base import Collaboration
from testbed.model.names import SERVER_ID
from testbed.model.profiles import load_profiles
from testbed.model.radio import DeviceLink, compute_links
from testbed.model.topology import FaultSpec, Topology, place
from testbed.relay.orchestrator import DevicePower, RelaySettings

__all__ = ["RunSession", "RunResult", "max_message_bytes"]


class RunSession:
    """The run owner (see the module docstring)."""

    def __init__(self, topo: Topology, source: CellSource | None = None, *, out_dir: Path | str | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None, seed: int | None = None,
                 started_at: float | None = None):
        if seed is not None:
            topo = topo.model_copy(update={"seed": seed})
        self.topology = topo
        self.links = compute_links(topo, place(topo))  # once per cell: every later reader gets these
        self.source: CellSource = source if source is not None else MadeCell()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.events = EventLog("", on_event)
        self.server = ServerSide()
        # where the start-up time goes (meta.startup), counted from `started_at`: the command's start
        self.clock = StartupClock(started_at, path=self.source.path)
        self.rig: Rig | None = None
        self._generations = 0
        self._generation_clock: StartupClock | None = None
        self._request: Request | None = None  # the generation running now
        self._background: set[asyncio.Future] = set()  # agents warming: the source's warm set, spares

    # -- lifecycle -------------------------------------------------------------------
    async def __aenter__(self) -> RunSession:
        t0 = time.time()
        if t0 - self.clock.t0 > 0.001:
            self.clock.mark("cli", self.clock.t0, t0)  # the command's start to here: interpreter, imports, input
        try:
            self.rig = await self.source.open(self.topology, self.links, self.clock,
                                              lambda: self.server.start(self.topology, self.clock))
            self.events.run_id = self.rig.run_id
            warm = warm_set(self.source.warm, self.rig.cell.device_ids())
            if warm and self.rig.agents is not None and self.rig.worker is None:
                self._in_background(self.warm_agents(warm))
        except BaseException:
            await asyncio.shield(self.close())
            raise
        self.clock.mark("session", t0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.shield(self.close())

    async def close(self) -> None:
        """Tear down what the source made (agents, broker, cell, run directory)."""
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(BaseException):
                await task
        await self.server.close()
        rig, self.rig = self.rig, None
        try:
            if rig is not None and rig.agents is not None:
                with contextlib.suppress(Exception):
                    await rig.agents.close()
        finally:
            await self.source.close()
            self.events.close()

    async def warm_agents(self, devices: list[str]) -> None:
        """Start the agents of `devices` and wait until they are online (the `agents` phase):
        the agents a cell keeps warm start as soon as the template, the cell and the broker
        are ready, not when a plan asks for them."""
        with self.clock.span("agents"):
            await ensure_online(self.need_rig(), devices, self.relay_settings("monitor"), self.in_server_ns)

    def _in_background(self, coro: Any) -> asyncio.Future:
        """Agents warming while generations go on: a failure is reported (and a generation
        that needs that agent waits for it itself), never left unretrieved."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)

        def done(t: asyncio.Future) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                print(f"run {self.run_id}: agents warming in the background: {t.exception()}", flush=True)

        task.add_done_callback(done)
        return task

    def need_rig(self) -> Rig:
        if self.rig is None:
            raise RunFailedError("this run session is not open: use `async with RunSession(...)`")
        return self.rig

    @property
    def run_id(self) -> str | None:
        return self.rig.run_id if self.rig is not None else getattr(self.source, "run_id", None)

    @property
    def cell(self) -> Any:
        return self.rig.cell if self.rig is not None else None

    @property
    def agents(self) -> Any:
        return self.rig.agents if self.rig is not None else None

    @property
    def timings_s(self) -> dict[str, float]:
        """Seconds each start-up phase took (cell, broker, template, session, ...)."""
        return {f"{name}_s": secs for name in self.clock.phases if (secs := self.clock.seconds(name)) is not None}

    @property
    def template_pid(self) -> int | None:
        """The agent template's pid, when this session started it (benchmarks measure its memory)."""
        return getattr(self.agents, "template_pid", None)

    def require_broker(self) -> None:
        """Generations need the cell's broker (a cell can be brought up without one)."""
        if self.need_rig().cell.broker is None:
            raise RunFailedError(f"run {self.run_id} was brought up without a broker (--no-broker); "
                                 "bring it up again without that option to run generations on it")

    # -- devices ---------------------------------------------------------------------
    async def kill(self, device: str) -> None:
        """Fault injection: stop the device's agent and everything in its node."""
        await self.need_rig().cell.kill(device)

    async def revive(self, device: str) -> int:
        """The device is up again with a fresh agent (same config and credentials); its pid."""
        agents = self.need_rig().agents
        if agents is None:
            raise RunFailedError(f"revive {device}: this run has no agents")
        return await agents.revive(device)

    # -- one generation --------------------------------------------------------------
    async def run(self, collab: Collaboration | str = "multistage", *, selector: str | None = None,
                  t_max_s: float | None = None, e_max_j: float | None = None, faults: list[FaultSpec] | None = None,
                  fail: str | None = None, out_dir: Path | None = None, topology: Topology | None = None,
                  startup: StartupClock | None = None, strategy: str | None = None,
                  confidence: float | None = None) -> RunResult:
        """One generation under the budgets (default: the topology's). `faults` (default: the
        topology's `faults:`) are injected as the run goes; `fail` kills that selected device
        halfway through its stage's computation. `strategy`: the older name of `selector`.

        `topology`: this generation's scenario on the same cell (the up cell's supervisor
        runs other files' generations): its budgets, faults, seed-free workload fields
        (prompt, scheduler, steps) apply; its devices and what configures the agents must be
        the cell's. `startup`: the clock of the command that asked for it (meta.startup);
        default: the session's own for its first generation. `confidence`: keep P(latency <=
        T_max) >= it under the modelled distributions (methods that take one; InputError else)."""
        rig = self.need_rig()
        topo = topology or self.topology
        if topology is not None:
            same_cell(rig.run_id, topology, compute_links(topology, place(topology)), rig.cell.links)
            self._check_same_agents(topology)
        if startup is None:
            startup = self.clock if self._generations == 0 else StartupClock(path="warm")
        self._generations += 1
        if rig.worker is not None:
            return await self._run_in_worker(rig, topo, collab, selector or strategy, t_max_s, e_max_j, faults, fail,
                                             Path(out_dir) if out_dir is not None else self.out_dir, startup, confidence)
        if isinstance(collab, str):
            collab = method_spec(collab).make(selector or strategy)
        req = Request(topo, collab, t_max_s if t_max_s is not None else topo.budgets.t_max_s,
                      e_max_j if e_max_j is not None else topo.budgets.e_max_j,
                      tuple(topo.faults if faults is None else faults), fail,
                      Path(out_dir) if out_dir is not None else self.out_dir, startup, confidence)
        self.events.listeners.append(startup.feed)
        self._generation_clock, self._request = startup, req
        try:
            return await Generation(rig, self.events, self.server, self).run(req)
        finally:
            self.events.listeners.remove(startup.feed)
            self._generation_clock = self._request = None

    async def _run_in_worker(self, rig: Rig, topo: Topology, collab: Collaboration | str, selector: str | None,
                             t_max_s: float | None, e_max_j: float | None, faults: list[FaultSpec] | None,
                             fail: str | None, out_dir: Path | None, startup: StartupClock,
                             confidence: float | None = None) -> RunResult:
        """The generation in the cell's worker (it holds torch, the server's model and the
        agents); its events come back as they happen, its outputs are written by it."""
        if not isinstance(collab, str):
            raise InputError(f"run {rig.run_id} runs its generations in its worker process: "
                             f"give the method by name ({collab.name!r}), not a Collaboration object")
        scenario = topo.model_dump(mode="json", exclude_unset=True)  # what the file said; the worker checks it again
        if faults is not None:
            scenario["faults"] = [f.model_dump(mode="json") for f in faults]
        assert rig.worker is not None
        doc = await rig.worker.generate(
            self.events.record, topology=scenario, method=collab, selector=selector, t_max_s=t_max_s, e_max_j=e_max_j,
            fail=fail, out_dir=str(out_dir.resolve()) if out_dir is not None else None, started_at=startup.t0,
            startup_path=startup.path, confidence=confidence,
            phases={name: [startup.t0 + a, startup.t0 + b] for name, (a, b) in startup.phases.items()})
        return RunResult(doc, out_dir)

    def _check_same_agents(self, topo: Topology) -> None:
        """The warm agents were configured from the cell's workload: these fields must match."""
        mine, theirs = self.topology.workload, topo.workload
        differ = [f"workload.{k} is {getattr(theirs, k)!r} here but {getattr(mine, k)!r} on the cell"
                  for k in ("model", "compute", "resolution_px", "payload_bytes") if getattr(mine, k) != getattr(theirs, k)]
        if differ:
            raise TopologyError(f"run {self.run_id}: {'; '.join(differ)}; its agents were configured at `testbed up`: "
                                "bring the cell up with this file, or run it without --run")

    # -- what methods borrow (methods/base.py RunServices) ---------------------------
    def relay_settings(self, role: str = "server") -> RelaySettings:
        """How a role reaches the broker: `server` (the orchestrator), `events` (the run
        owner's event publisher) on the cell listener, `monitor` (who is online) on the watch
        listener. Each role logs in as itself: its client id is its account's."""
        rig = self.need_rig()
        broker, creds = rig.cell.broker, rig.credentials
        if broker is None or creds is None:
            raise RunFailedError(f"run {rig.run_id}: no broker is up")
        cred = {"server": creds.server, "events": creds.events, "monitor": creds.monitor}[role] or creds.server
        watch = role == "monitor" and creds.monitor is not None and broker.settings.watch_port is not None
        return RelaySettings(rig.run_id, broker.host, broker.settings.watch_port if watch else broker.port,
                             cred.username, cred.password, max_message_bytes(self.topology))

    async def ensure_agents(self, devices: list[str], *, spare: list[str] | tuple[str, ...] = ()) -> None:
        """Agents of `devices` (what the plan selected) are running and online — only those
        are waited for; an agent that dies at start fails the wait at once. `spare` (a
        recovery's pool, best first; at most MAX_SPARE_AGENTS) start in the background, or
        are waited for too when this generation injects faults (a kill's recovery needs them)."""
        t0 = time.time()
        rig, settings = self.need_rig(), self.relay_settings("monitor")
        spares = [d for d in dict.fromkeys(spare) if d not in devices][:MAX_SPARE_AGENTS]
        req = self._request
        if spares and req is not None and (req.faults or req.fail):
            devices, spares = [*devices, *spares], []
        n = await ensure_online(rig, list(devices), settings, self.in_server_ns)
        if spares:
            self._in_background(ensure_online(rig, spares, settings, self.in_server_ns))
        if self._generation_clock is not None:
            self._generation_clock.mark("agents_wait", t0)
        self.emit("agents_online", None, devices=n, waited_s=time.time() - t0)

    async def server_model(self) -> Any:
        return await self.server.model()

    def power(self) -> dict[str, DevicePower]:
        profiles = load_profiles()
        return {lk.id: DevicePower(profiles[lk.profile].compute_power_w, profiles[lk.profile].radio_tx_power_w,
                                   profiles[lk.profile].radio_rx_power_w) for lk in self.need_rig().cell.links}

    def emit(self, etype: str, device: str | None = None, **data: Any) -> None:
        self.events.emit(etype, device, **data)

    def event_sink(self) -> Callable[[dict[str, Any]], None]:
        return self.events.threadsafe()

    async def in_server_ns(self, factory: Callable[[], Any]) -> Any:
        """Await `factory()` on an event loop in a thread inside the edge server's namespace,
        so that its sockets reach the broker at 198.18.0.1 whether or not this run owns the
        host's route to 198.18.0.0/16 (concurrent runs share it); directly when the server
        is this process's own host (a deployment)."""
        from testbed.composition.ns_loop import run_in_netns

        netns = self.need_rig().cell.nodes[SERVER_ID].netns
        if netns is None:
            return await factory()
        return await run_in_netns(netns, factory, name=f"tb-{self.run_id}-server-ns")
