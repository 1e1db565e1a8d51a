"""`RunSession`: the run owner — one cell, its broker, its agents, its runs and their outputs.

    async with RunSession(topo, backend="netns", out_dir=out) as session:
        result = await session.run("multistage", strategy="dp")   # or a Collaboration object
        other = await session.run("split", t_max_s=4)              # same cell, other budgets

It owns the run directory (`/run/testbed/<run>/`), the cell (made here, attached to a
`testbed up` cell with `attach=True`, or given, as compose's server does), the run's MQTT
credentials and ACL, the one broker start (through the cell), the agents (through the
one agent launcher, or the up cell's supervisor), the events (one `EventLog`), the device
selection (through the strategy's plan, with the cell's energy history) and the outputs:

    OUT/result.json    the result document (RunResult.to_json(); fields in docs/running.md)
    OUT/events.jsonl   every telemetry event, flushed as it happens
    OUT/image.png      the generated image
    OUT/logs/          agent-<device>.log, broker.log

What it made it tears down on exit, also on errors and Ctrl-C. `testbed run`, `testbed
sweep`, the TUI, compose's server and the `testbed up` supervisor all go through it (the
supervisor also runs `testbed run --run ID`'s generations: `run(topology=...)`).

Start-up overlaps (a cold `testbed run`): the agent template's imports, the cell, the
broker and the edge server's model start together; every agent is started as soon as the
template, the cell and the broker are ready, before any plan asks for it. Where the time
went is the result's `meta.startup` (startup.py), counted from `started_at`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from testbed.composition.agents import AgentLauncher, Agents, RemoteAgents, agent_config
from testbed.composition.events import EventLog, EventPublisher
from testbed.composition.faults import FaultInjector
from testbed.composition.history import EnergyHistory
from testbed.composition.meta import run_meta
from testbed.composition.startup import StartupClock
from testbed.composition.strategies import Collaboration, PlanContext, RelaySettings, make_strategy
from testbed.composition.strategies.split import largest_message_bytes
from testbed.emulation.cell import BrokerSettings, Cell
from testbed.errors import ResourceError, RunFailedError, TestbedError, TopologyError
from testbed.model.names import MQTT_PORT, SERVER_ADDRESS, SERVER_ID, STATE_ROOT
from testbed.model.profiles import load_profiles
from testbed.model.radio import DeviceLink, compute_links
from testbed.model.topology import FaultSpec, Topology, place
from testbed.relay import security

__all__ = ["RunSession", "RunResult", "ExternalAgents", "max_message_bytes"]

_AGENT_STARTUP_S = 60.0  # per 2 CPU cores: importing torch + diffusers and loading a model


@dataclass
class RunResult:
    doc: dict[str, Any]
    out_dir: Path | None
    image_array: np.ndarray | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return self.doc


def max_message_bytes(topo: Topology) -> int:
    """The broker's and the agents' size limit: the largest message any method sends, plus headroom."""
    wl = topo.workload
    return max(wl.payload_bytes, largest_message_bytes(wl.resolution_px)) + 4 * 2**20


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


class RunSession:
    """The run owner (see the module docstring)."""

    def __init__(
        self,
        topo: Topology,
        *,
        run_id: str | None = None,
        backend: str = "netns",
        attach: bool = False,
        out_dir: Path | str | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        seed: int | None = None,
        broker: bool = True,
        cell: Cell | None = None,
        credentials: security.RunCredentials | None = None,
        state_dir: Path | None = None,
        started_at: float | None = None,
    ):
        if seed is not None:
            topo = topo.model_copy(update={"seed": seed})
        self.topology = topo
        self.run_id = run_id
        self.backend = backend
        self.attach = attach
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.with_broker = broker
        self.events = EventLog(run_id or "", on_event)
        self.cell: Cell | None = cell
        self.creds = credentials
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.agents: Agents | None = None
        self.history: EnergyHistory | None = None
        self.t_max_s, self.e_max_j = topo.budgets.t_max_s, topo.budgets.e_max_j
        # where the start-up time goes (meta.startup), counted from `started_at`: the command's start
        self.clock = StartupClock(started_at, path="attached" if attach else "given" if cell is not None else "cold")
        self._generations = 0
        self._given_cell = cell is not None
        self._owns_cell = False
        self._owns_state = False
        self._launcher: AgentLauncher | None = None
        self._model_task: asyncio.Future | None = None
        self._references: dict[tuple, asyncio.Future] = {}  # the MS-SSIM reference of each workload
        self._warmup: asyncio.Future | None = None  # every agent started and online (cold runs)
        self._generation_clock: StartupClock | None = None

    # -- lifecycle -------------------------------------------------------------------
    async def __aenter__(self) -> RunSession:
        t0 = time.time()
        if t0 - self.clock.t0 > 0.001:
            self.clock.mark("cli", self.clock.t0, t0)  # the command's start to here: interpreter, imports, input
        try:
            if self.attach:
                await self._attach()
            elif self._given_cell:
                await self._given()
            else:
                await self._make()
        except BaseException:
            await asyncio.shield(self.close())
            raise
        self.clock.mark("session", t0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.shield(self.close())

    @property
    def timings_s(self) -> dict[str, float]:
        """Seconds each start-up phase took (cell, broker, template, session, ...)."""
        return {f"{name}_s": secs for name in self.clock.phases if (secs := self.clock.seconds(name)) is not None}

    def _template_started(self, fut: asyncio.Future) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.clock.mark("template", time.time() - fut.result())

    def _start_server_side(self) -> None:
        """The edge server's fp32 model, then the MS-SSIM reference, load in the background
        (one after the other: diffusers' lazy imports are not safe from two threads at once)."""
        from testbed.relay.stage import StageModel

        def load() -> Any:
            with self.clock.span("server_model"):
                return StageModel.load(self.topology.workload.model, "fp32")

        self._model_task = asyncio.ensure_future(asyncio.to_thread(load))
        self._reference_for(self.topology, self.clock)

    def _reference_for(self, topo: Topology, clock: StartupClock) -> asyncio.Future:
        """The MS-SSIM reference of `topo`'s workload (fp32, same prompt and seed), made in the
        background after the server's model (its time on `clock`) and kept per workload;
        quality.reference_image also caches it on disk, so a later process reads it."""
        wl = topo.workload
        key = (wl.model, wl.prompt, topo.seed, wl.reference_steps, wl.scheduler)
        if key not in self._references:
            def make() -> np.ndarray:
                from testbed.diffusion.quality import reference_image  # (torch: off this loop's thread)

                with clock.span("reference"):
                    return reference_image(wl.model, wl.prompt, topo.seed, steps=wl.reference_steps,
                                           scheduler_kind=wl.scheduler)

            async def after_model() -> np.ndarray:
                if self._model_task is not None:
                    with contextlib.suppress(Exception):  # its failure is reported where the model is needed
                        await self._model_task
                return await asyncio.to_thread(make)

            self._references[key] = asyncio.ensure_future(after_model())
        return self._references[key]

    async def _make(self) -> None:
        from testbed.emulation.emulation import Emulation
        from testbed.emulation.runs import make_run_dir, new_run_id, write_state, write_topology

        self.run_id = self.run_id or new_run_id()
        self.events.run_id = self.run_id
        if self.state_dir is None:  # (the `testbed up` supervisor is handed the one its command made)
            self.state_dir = make_run_dir(self.run_id)
            self._owns_state = True
        write_topology(self.run_id, self.topology)  # for `testbed tui --attach RUN`
        logs = self.state_dir / "logs"
        if self.with_broker:  # the template's imports overlap the cell's creation and the server's model
            self._launcher = AgentLauncher(self.run_id, self.state_dir, logs, preload=self._preloaded_variants())
            self._launcher.start().add_done_callback(self._template_started)
            await asyncio.sleep(0)  # the template's process starts now, before this thread imports the emulation
            self._start_server_side()
        with self.clock.span("cell"):
            cell = Emulation(self.topology, self.run_id, backend=self.backend, state_dir=self.state_dir)
            self.cell = cell
            await cell.__aenter__()
        self._owns_cell = True
        if self.with_broker:
            self.creds = security.make_credentials(self.run_id, cell.device_ids())
            paths = security.write_security_files(self.state_dir / "secrets", self.creds, SERVER_ADDRESS, MQTT_PORT)
            shutil.copy2(paths["observer"], self.state_dir / "observer.json")
            with self.clock.span("broker"):
                await cell.start_broker(BrokerSettings(paths["password_file"], paths["acl_file"],
                                                       self.max_message_bytes))
            uids = self._write_agent_configs()
            assert self._launcher is not None
            self._launcher.bind(cell, uids)
            self.agents = self._launcher
            self._warmup = asyncio.ensure_future(self._warm_agents(cell.device_ids()))
        self.history = EnergyHistory(self.state_dir)
        write_state(self.run_id, cell.status() | {"topology": self.topology.name, "seed": self.topology.seed})

    def _preloaded_variants(self) -> list[tuple[str, str]]:
        """The model variants the agent template loads before it forks: the embedded tiny
        model's, shared copy-on-write by every agent. A real model (SD1.5, GBs) is loaded by
        each agent inside its node, where its memory counts against the device's limit."""
        wl = self.topology.workload
        if wl.model != "tiny":
            return []
        return [(wl.model, p) for p in sorted({lk.precision for lk in compute_links(self.topology, place(self.topology))})]

    async def _warm_agents(self, devices: list[str]) -> None:
        """Every device's agent starts as soon as the template, the cell and the broker are
        ready, not when a plan asks for them: the first stage does not wait for 20 agents."""
        with self.clock.span("agents"):
            await self._ensure_online(devices)

    async def _attach(self) -> None:
        from testbed.emulation.attached import AttachedCell, control_path
        from testbed.emulation.runs import run_dir

        if self.run_id is None:
            raise RunFailedError("attach: give the run id of a cell that `testbed up` keeps alive (--run ID)")
        self.events.run_id = self.run_id
        self.state_dir = run_dir(self.run_id)
        self._start_server_side()
        cell = await AttachedCell.connect(self.run_id)
        self.cell = cell
        self._check_same_cell(cell.links)
        self.require_broker()
        self.creds = security.load_credentials(self.state_dir / "secrets" / "credentials.json")
        self.agents = RemoteAgents(control_path(self.run_id))
        self.history = EnergyHistory(self.state_dir)

    def require_broker(self) -> None:
        """Generations need the cell's broker (a cell can be brought up without one)."""
        if self._need_cell().broker is None:
            raise RunFailedError(f"run {self.run_id} was brought up without a broker (--no-broker); "
                                 "bring it up again without that option to run generations on it")

    def _check_same_cell(self, links: list[DeviceLink], topo: Topology | None = None) -> None:
        topo = topo or self.topology
        mine = compute_links(topo, place(topo))
        key = (lambda lks: sorted((lk.id, round(lk.x_m, 3), round(lk.y_m, 3), lk.precision) for lk in lks))
        if key(mine) != key(links):
            raise TopologyError(
                f"run {self.run_id} was brought up with other devices or positions than {topo.name!r} "
                f"with seed {topo.seed}; give the topology file and --seed the cell was brought up with")

    async def _given(self) -> None:
        """A cell made elsewhere (compose): its credentials given, its agents external."""
        assert self.cell is not None and self.state_dir is not None and self.creds is not None
        self.run_id = self.cell.run_id
        self.events.run_id = self.run_id
        self._start_server_side()
        secrets = self.state_dir / "secrets"
        await self.cell.start_broker(BrokerSettings(secrets / "mosquitto.passwd", secrets / "mosquitto.acl",
                                                    self.max_message_bytes))
        self.agents = ExternalAgents()
        self.history = EnergyHistory(self.state_dir)

    @property
    def max_message_bytes(self) -> int:
        return max_message_bytes(self.topology)

    def _write_agent_configs(self) -> dict[str, int]:
        """Each device's config, readable only by the uid allocated to its agent (0400);
        agents/ lets them reach their own file but not list the others. The uids."""
        from testbed.emulation.node_uids import allocate_uids, hand_to

        assert self.cell is not None and self.creds is not None and self.state_dir is not None
        agents = self.state_dir / "agents"
        agents.mkdir(mode=0o711, exist_ok=True)
        agents.chmod(0o711)
        uids = allocate_uids(self.state_dir, [link.id for link in self.cell.links])
        for link in self.cell.links:
            node = self.cell.nodes[link.id]
            cfg = agent_config(self.topology, link, self.run_id or "", self.creds.for_device(link.id), SERVER_ADDRESS,
                               MQTT_PORT, node.cpu_quota_cores or float(os.cpu_count() or 1), self.max_message_bytes)
            cfg.write(agents / f"{link.id}.json")
            hand_to(agents / f"{link.id}.json", uids[link.id])
        return uids

    async def close(self) -> None:
        """Tear down what this session made (agents, broker, cell, run directory)."""
        if self._warmup is not None and not self._warmup.done():
            self._warmup.cancel()
        for task in (self._warmup, self._model_task, *self._references.values()):
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task  # a thread cannot be cancelled: wait for it, ignore its outcome
        if self.agents is not None:
            with contextlib.suppress(Exception):
                await self.agents.close()
            self.agents = None
        elif self._launcher is not None:
            await self._launcher.close()
        if self.cell is not None and (self._owns_cell or self._given_cell or self.attach):
            try:
                await self.cell.close()
            finally:
                self.cell = None
        if self._owns_state and self.state_dir is not None:
            from testbed.emulation.owned_dirs import remove_owned_dir

            remove_owned_dir(self.state_dir, STATE_ROOT)
        self.events.close()

    @property
    def template_pid(self) -> int | None:
        """The agent template's pid, when this session started it (benchmarks measure its memory)."""
        return self._launcher.template_pid if self._launcher is not None else None

    # -- what strategies use (strategies/base.py RunContext) -------------------------
    def relay_settings(self) -> RelaySettings:
        cell = self._need_cell()
        if cell.broker is None or self.creds is None:
            raise RunFailedError(f"run {self.run_id}: no broker is up")
        return RelaySettings(self.run_id or "", cell.broker.host, cell.broker.port, self.creds.server.username,
                             self.creds.server.password, self.max_message_bytes)

    async def server_model(self) -> Any:
        if self._model_task is None:
            self._start_server_side()
        assert self._model_task is not None
        return await self._model_task

    def power(self) -> dict[str, Any]:
        from testbed.relay.server import DevicePower

        profiles = load_profiles()
        return {lk.id: DevicePower(profiles[lk.profile].compute_power_w, profiles[lk.profile].radio_tx_power_w,
                                   profiles[lk.profile].radio_rx_power_w) for lk in self._need_cell().links}

    def emit(self, etype: str, device: str | None = None, **data: Any) -> None:
        self.events.emit(etype, device, **data)

    def event_sink(self) -> Callable[[dict[str, Any]], None]:
        return self.events.threadsafe()

    async def in_server_ns(self, factory: Callable[[], Any]) -> Any:
        """Await `factory()` on an event loop in a thread inside the edge server's namespace,
        so that its sockets reach the broker at 198.18.0.1 whether or not this run owns the
        host's route to 198.18.0.0/16 (concurrent runs share it); directly when the server
        is this process's own host (compose)."""
        from testbed.composition.ns_loop import run_in_netns

        netns = self._need_cell().nodes[SERVER_ID].netns
        if netns is None:
            return await factory()
        return await run_in_netns(netns, factory, name=f"tb-{self.run_id}-server-ns")

    async def ensure_agents(self, devices: list[str]) -> None:
        """Agents of `devices` are running and online; an agent that dies at start fails the wait at once."""
        t0 = time.time()
        if self._warmup is not None:  # its failure (an agent that died at start) is this wait's; once
            warmup, self._warmup = self._warmup, None
            await warmup
        n = await self._ensure_online(devices)
        if self._generation_clock is not None:
            self._generation_clock.mark("agents_wait", t0)
        self.emit("agents_online", None, devices=n, waited_s=time.time() - t0)

    async def _ensure_online(self, devices: list[str]) -> int:
        """Start what is missing among `devices` (not killed) and wait until each is online; how many."""
        if self.agents is None:
            raise RunFailedError(f"run {self.run_id}: no agents (the cell has no broker)")
        cell = self._need_cell()
        devices = [d for d in devices if cell.nodes[d].state != "killed"]
        await self.agents.ensure(devices)
        waiting = asyncio.ensure_future(self.in_server_ns(lambda: self._wait_online(devices)))
        try:
            while not waiting.done():
                await asyncio.wait({waiting}, timeout=0.5)
                if not waiting.done():
                    self._check_agents_alive(devices)
            waiting.result()
        finally:
            if not waiting.done():
                waiting.cancel()
                with contextlib.suppress(BaseException):
                    await waiting
        return len(devices)

    def _check_agents_alive(self, devices: list[str]) -> None:
        from testbed.emulation.procs import pid_alive

        assert self.agents is not None
        pids = self.agents.pids()
        logs = self.state_dir / "logs" if self.state_dir is not None else Path(".")
        for dev in devices:
            pid = pids.get(dev)
            if pid is not None and not pid_alive(pid):
                log = logs / f"agent-{dev}.log"
                lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
                raise RunFailedError(f"the agent of {dev} exited before coming online: "
                                     f"{lines[-1] if lines else 'no output'} (log: {log})")

    async def _wait_online(self, devices: list[str]) -> None:
        import aiomqtt

        from testbed.relay import topics

        rs = self.relay_settings()
        timeout_s = _AGENT_STARTUP_S + 4.0 * len(devices)
        want, seen = set(devices), set()
        async with aiomqtt.Client(rs.broker_host, rs.broker_port, username=rs.username, password=rs.password,
                                  timeout=10, identifier=f"tb-{self.run_id}-owner-wait") as client:
            await client.subscribe(f"tb/{self.run_id}/dev/+/status", qos=1)
            try:
                async with asyncio.timeout(timeout_s):
                    async for m in client.messages:
                        parsed = topics.parse_device_topic(self.run_id or "", str(m.topic))
                        try:
                            state = json.loads(bytes(m.payload)).get("state")
                        except (ValueError, AttributeError, TypeError):
                            continue
                        if parsed is not None and state == "online":
                            seen.add(parsed[0])
                        if want <= seen:
                            return
            except TimeoutError:
                raise RunFailedError(f"agents {sorted(want - seen)} did not come online within {timeout_s:g} s; "
                                     "see their logs (agent-<device>.log)") from None

    def _need_cell(self) -> Cell:
        if self.cell is None:
            raise RunFailedError("this run session is not open: use `async with RunSession(...)`")
        return self.cell

    # -- devices ---------------------------------------------------------------------
    def current_links(self) -> list[DeviceLink]:
        """The devices that can take part (not killed), with the rates the cell applies now."""
        cell = self._need_cell()
        out = []
        for link in cell.links:
            node = cell.nodes[link.id]
            if node.state == "killed":
                continue
            out.append(link.model_copy(update={"rate_up_mbps": node.rate_up_mbps or link.rate_up_mbps,
                                               "rate_down_mbps": node.rate_down_mbps or link.rate_down_mbps}))
        return out

    async def kill(self, device: str) -> None:
        """Fault injection: stop the device's agent and everything in its node."""
        await self._need_cell().kill(device)

    async def revive(self, device: str) -> int:
        """The device is up again with a fresh agent (same config and credentials); its pid."""
        if self.agents is None:
            raise RunFailedError(f"revive {device}: this run has no agents")
        return await self.agents.revive(device)

    # -- one generation --------------------------------------------------------------
    async def run(self, collab: Collaboration | str = "multistage", *, strategy: str = "dp",
                  t_max_s: float | None = None, e_max_j: float | None = None, faults: list[FaultSpec] | None = None,
                  fail: str | None = None, out_dir: Path | None = None, topology: Topology | None = None,
                  startup: StartupClock | None = None) -> RunResult:
        """One generation under the budgets (default: the topology's). `faults` (default: the
        topology's `faults:`) are injected as the run goes; `fail` kills that selected device
        halfway through its stage's computation.

        `topology`: this generation's scenario on the same cell (the up cell's supervisor
        runs other files' generations): its budgets, faults, seed-free workload fields
        (prompt, scheduler, steps) apply; its devices and what configures the agents must be
        the cell's. `startup`: the clock of the command that asked for it (meta.startup);
        default: the session's own for its first generation."""
        if topology is not None:
            self._check_same_cell(self._need_cell().links, topology)
            self._check_same_agents(topology)
        if startup is None:
            startup = self.clock if self._generations == 0 else StartupClock(path="warm")
        self._generations += 1
        kept, self.topology = self.topology, topology or self.topology  # what RunContext readers see
        self._generation_clock = startup
        self.events.listeners.append(startup.feed)
        try:
            return await self._generate(collab, strategy, t_max_s, e_max_j, faults, fail, out_dir, startup)
        finally:
            self.events.listeners.remove(startup.feed)
            self._generation_clock = None
            self.topology = kept

    def _check_same_agents(self, topo: Topology) -> None:
        """The warm agents were configured from the cell's workload: these fields must match."""
        mine, theirs = self.topology.workload, topo.workload
        differ = [f"workload.{k} is {getattr(theirs, k)!r} here but {getattr(mine, k)!r} on the cell"
                  for k in ("model", "compute", "resolution_px", "payload_bytes") if getattr(mine, k) != getattr(theirs, k)]
        if differ:
            raise TopologyError(f"run {self.run_id}: {'; '.join(differ)}; its agents were configured at `testbed up`: "
                                "bring the cell up with this file, or run it without --run")

    async def _generate(self, collab: Collaboration | str, strategy: str, t_max_s: float | None,
                        e_max_j: float | None, faults: list[FaultSpec] | None, fail: str | None,
                        out_dir: Path | None, startup: StartupClock) -> RunResult:
        cell = self._need_cell()
        collab = make_strategy(collab, strategy) if isinstance(collab, str) else collab
        self.t_max_s = t_max_s if t_max_s is not None else self.topology.budgets.t_max_s
        self.e_max_j = e_max_j if e_max_j is not None else self.topology.budgets.e_max_j
        out = Path(out_dir) if out_dir is not None else self.out_dir
        if out is not None:
            (out / "logs").mkdir(parents=True, exist_ok=True)
        await cell.refresh()  # an attached cell: its nodes' states and rates as they are now
        self.events.open(out / "events.jsonl" if out is not None else None)
        reference = self._reference_for(self.topology, startup)  # in the background; needed after the generation
        await self.server_model()  # (its imports first: plans may import diffusers too)
        with startup.span("plan"):
            history = self.history.load() if self.history is not None else {}
            ctx = PlanContext(self.topology, self.current_links(), self.t_max_s, self.e_max_j, self.topology.seed,
                              history, cell.impairments)
            plan = collab.plan(ctx)
        specs = list(self.topology.faults if faults is None else faults)
        if fail is not None:
            if fail not in plan.selected:
                raise TopologyError(f"--fail {fail}: not a selected device (selected: {', '.join(plan.selected)}); "
                                    "pick one of those")
            specs = [f for f in specs if not (f.kind == "kill" and f.device == fail)]
            specs.append(FaultSpec(kind="kill", device=fail, at_stage=plan.selected.index(fail)))
        costs = {c.id: c for c in getattr(plan, "costs", [])}
        publisher = await self._start_publisher()
        try:
            self.emit("selection", None, method=collab.method, strategy=collab.strategy, selected=plan.selected,
                      predicted_latency_s=plan.predicted_latency_s, predicted_energy_j=plan.predicted_energy_j,
                      plan=plan.to_json())
            injector = FaultInjector(cell, self.emit, costs, specs)
            self.events.listeners.append(injector.feed)
            try:
                outcome = await collab.execute(self, plan)
            except TestbedError as e:
                self.emit("run_failed", None, error=str(e), exit_code=e.exit_code)  # observers stop following
                raise
            finally:
                self.events.listeners.remove(injector.feed)
                await injector.close()
            image = await asyncio.to_thread(self._image, outcome.latent, out, await reference)
            if self.history is not None:
                self.history.add(outcome.energy_by_device)
            doc = self._result_doc(collab, plan, outcome, image, injector, startup)
            self.emit("run_finished", None, latency_s=outcome.latency_s, energy_j=outcome.energy_j,
                      recovered=len(outcome.recovered), ms_ssim=image["ms_ssim"], image=image["image"])
        finally:
            if publisher is not None:
                await self._stop_publisher(publisher)
        if out is not None:
            (out / "result.json").write_text(json.dumps(doc, indent=2) + "\n")
            self._copy_logs(out / "logs")
        self.events.close()
        return RunResult(doc, out, image.get("array"))

    async def _start_publisher(self) -> tuple[EventPublisher, asyncio.Future] | None:
        """The run owner's MQTT publisher for this generation (none without a broker)."""
        if self.creds is None or self._need_cell().broker is None:
            return None
        rs = self.relay_settings()
        pub = EventPublisher(rs.broker_host, rs.broker_port, rs.username, rs.password, rs.run)
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        task = asyncio.ensure_future(self.in_server_ns(
            lambda: pub.serve(lambda: loop.call_soon_threadsafe(ready.set_result, None))))
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # it failed before it could serve: say why
        self.events.publisher = pub
        return pub, task

    async def _stop_publisher(self, publisher: tuple[EventPublisher, asyncio.Future]) -> None:
        pub, task = publisher
        pub.close()
        self.events.publisher = None
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=10)
        except (TimeoutError, Exception):  # noqa: BLE001 - best effort: the events are in events.jsonl
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    def _image(self, latent: Any, out: Path | None, ref: np.ndarray) -> dict[str, Any]:
        from testbed.diffusion.quality import ms_ssim

        model = self._model_task.result() if self._model_task is not None else None
        if model is None:
            raise RunFailedError("the edge server's model did not load")
        img = model.decode(latent)
        info: dict[str, Any] = {"image": None, "ms_ssim": None, "image_shape": list(img.shape), "array": img}
        if out is not None:
            from PIL import Image

            Image.fromarray(img).save(out / "image.png")
            info["image"] = str(out / "image.png")
        info["ms_ssim"] = ms_ssim(img, ref)
        return info

    def _result_doc(self, collab: Collaboration, plan: Any, outcome: Any, image: dict[str, Any],
                    injector: FaultInjector, startup: StartupClock) -> dict[str, Any]:
        cell = self._need_cell()
        model = self._model_task.result() if self._model_task is not None else None
        doc = {
            "run": self.run_id,
            "method": collab.method,
            "strategy": collab.strategy,
            "seed": self.topology.seed,
            "selected": list(plan.selected),
            "relay_order": list(outcome.relay_order),
            "stages": outcome.stages,
            "latency_s": outcome.latency_s,
            "energy_j": outcome.energy_j,
            "predicted_latency_s": plan.predicted_latency_s,
            "predicted_energy_j": plan.predicted_energy_j,
            "t_max_s": self.t_max_s,
            "e_max_j": self.e_max_j,
            "within_budget": {"latency": outcome.latency_s <= self.t_max_s, "energy": outcome.energy_j <= self.e_max_j},
            "total_steps": outcome.total_steps,
            "ms_ssim": image.get("ms_ssim"),
            "image": image.get("image"),
            "recovered": outcome.recovered,
            "faults": [f.to_json() for f in injector.injected],
            **outcome.extra,
        }
        doc["meta"] = run_meta(self.topology, cell, outcome, model, image) | {"plan": plan.to_json(),
                                                                               "startup": startup.to_json()}
        return doc

    def _copy_logs(self, dest: Path) -> None:
        """The agents' and the broker's logs of this run, next to its result."""
        cell = self._need_cell()
        srcs: list[Path] = []
        if self.state_dir is not None:
            srcs += sorted((self.state_dir / "logs").glob("agent-*.log"))
        if cell.broker is not None and cell.broker.log_path.exists():
            srcs.append(cell.broker.log_path)
        for src in srcs:
            name = "broker.log" if cell.broker is not None and src == cell.broker.log_path else src.name
            with contextlib.suppress(OSError):
                shutil.copy2(src, dest / name)
