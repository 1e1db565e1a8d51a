"""Cell sources: where a run owner gets its cell, and what comes with it.

A source supplies a `Rig` — the cell, the run's MQTT credentials, the agents, the energy
history and the run's state directory — and tears down what it made:

| source | the cell | its agents |
| --- | --- | --- |
| `MadeCell` (`testbed run FILE`, the `testbed up` supervisor, sweeps, the TUI) | `Emulation(...)`, made here, torn down at the end | `AgentLauncher`: this process's template |
| `AttachedCellSource` (a `testbed up` cell, library users) | `AttachedCell.connect(ID)`; left up | `RemoteAgents`: the supervisor's |
| `GivenCell` (compose/Swarm deployment's server) | made elsewhere, handed in | `ExternalAgents`: each device service starts its own |
| `MadeCell(worker=True)` (`testbed run FILE`, the `testbed up` supervisor) | made here, served to its worker | `WorkerAgents`: the worker's (worker.py), which also runs the generations |
| `WorkerCell` (the worker itself) | its owner's, through the control socket | `AgentLauncher`: a template forked from the worker; for a Swarm cell `RemoteAgents` (its owner's keepers) |
| `SwarmCell` (swarm_cells.py; the `testbed up --backend swarm --cluster NAME` supervisor, by `supervisor.cell_source`) | `SwarmEmulation` across a cluster's nodes, served to its worker | `KeeperAgents`: each device's keeper; the worker (no template) runs the generations |

`open(topo, links, clock, started)` gets the topology, its links (computed once by the run
owner), the start-up clock and `started()`, called once the slow background work has begun
(the agent template's imports) so that the owner can start its own (the server's model) —
not by a source whose generations run in its worker. `warm`: which agents the run owner
starts as soon as the cell is up (online.warm_set: "auto" is every device of a cell of up to
32; "none" leaves them to the plans).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from testbed.composition.agents import AgentLauncher, Agents, ExternalAgents, RemoteAgents, write_agent_configs
from testbed.composition.worker_link import WorkerAgents, write_worker_topology
from testbed.composition.history import EnergyHistory
from testbed.composition.startup import StartupClock
from testbed.emulation.cell import BrokerSettings, Cell
from testbed.errors import RunFailedError, TopologyError
from testbed.model.names import MQTT_PORT, SERVER_ADDRESS, STATE_ROOT
from testbed.model.radio import DeviceLink
from testbed.model.topology import Topology
from testbed.relay import security

__all__ = ["Rig", "CellSource", "MadeCell", "AttachedCellSource", "GivenCell", "WorkerCell", "max_message_bytes",
           "same_cell", "preloaded_variants"]


def max_message_bytes(topo: Topology) -> int:
    """The broker's and the agents' size limit: the largest message any method sends, plus headroom."""
    from testbed.methods import methods

    wl = topo.workload
    largest = [m.largest_message_bytes(wl.resolution_px) for m in methods()]
    return max([wl.payload_bytes, *(b for b in largest if b)]) + 4 * 2**20


@dataclass
class Rig:
    """What a cell source supplies a run owner."""

    run_id: str
    cell: Cell
    credentials: security.RunCredentials | None
    agents: Agents | None
    history: EnergyHistory | None
    state_dir: Path | None
    worker: WorkerAgents | None = None  # runs the generations on this cell (this process holds no torch)


class CellSource(Protocol):
    path: str  # how meta.startup names it: cold, attached, given
    warm: str  # which agents the run owner starts as soon as the cell is up (online.warm_set)

    async def open(self, topo: Topology, links: list[DeviceLink], clock: StartupClock,
                   started: Callable[[], None]) -> Rig: ...
    async def close(self) -> None: ...


def same_cell(run_id: str, topo: Topology, mine: list[DeviceLink], theirs: list[DeviceLink]) -> None:
    """A scenario for an up cell must have the cell's devices, positions and precisions."""
    key = (lambda lks: sorted((lk.id, round(lk.x_m, 3), round(lk.y_m, 3), lk.precision) for lk in lks))
    if key(mine) != key(theirs):
        raise TopologyError(
            f"run {run_id} was brought up with other devices or positions than {topo.name!r} "
            f"with seed {topo.seed}; give the topology file and --seed the cell was brought up with")


class MadeCell:
    """A cell this process makes: run directory, cell (`backend`), credentials, broker, and
    the agents. By default this process starts the agent template and loads the server's
    model itself (the TUI, sweeps, library sessions). `worker=True` (`testbed run FILE`, the
    `testbed up` supervisor): a worker process (worker.py) does both, with torch and
    diffusers imported once, and runs the generations; this process serves it the cell on
    the control socket (`control`) and imports no torch. `broker=False`: the cell alone
    (`up --no-broker`). `warm`: the agents started with the cell (online.warm_set).
    `preload_for`: the devices whose model variants the agent template makes before it forks
    (a cold run's plan; default every device's); another device's agent loads its own."""

    path = "cold"

    def __init__(self, run_id: str | None = None, *, backend: str = "netns", broker: bool = True,
                 state_dir: Path | None = None, worker: bool = False, warm: str = "auto",
                 preload_for: list[str] | None = None):
        self.run_id, self.backend, self.broker = run_id, backend, broker
        self.state_dir = Path(state_dir) if state_dir is not None else None  # given: the up command made it
        self._owns_state = state_dir is None
        self.worker = worker and broker
        self.warm = "none" if self.worker else warm  # a worker warms its own (it is told `worker_warm`)
        self.worker_warm = warm
        self.preload_for = preload_for  # the devices whose model variants the template makes (default: all)
        self.control: Any = None  # the control socket serving the cell to the worker
        self._cell: Any = None
        self._launcher: AgentLauncher | None = None
        self._worker: WorkerAgents | None = None

    async def open(self, topo: Topology, links: list[DeviceLink], clock: StartupClock,
                   started: Callable[[], None]) -> Rig:
        from testbed.emulation.emulation import Emulation
        from testbed.emulation.runs import make_run_dir, new_run_id, write_state, write_topology

        run_id = self.run_id = self.run_id or new_run_id()
        if self.state_dir is None:
            self.state_dir = make_run_dir(run_id)
        write_topology(run_id, topo)  # for `testbed tui --attach RUN`, and the worker's
        if self.worker:  # its imports overlap the cell's creation
            write_worker_topology(run_id, topo)
            first = links if self.preload_for is None else [lk for lk in links if lk.id in set(self.preload_for)]
            self._worker = WorkerAgents.spawn(run_id, warm=self.worker_warm, variants=preloaded_variants(topo, first))
        elif self.broker:  # the template's imports overlap the cell's creation and the server's model
            self._launcher = AgentLauncher(run_id, self.state_dir, self.state_dir / "logs",
                                           preload=preloaded_variants(topo, links))
            self._launcher.start().add_done_callback(  # (its result: how long the template took)
                lambda fut: None if fut.cancelled() or fut.exception() else clock.mark("template",
                                                                                      time.time() - fut.result()))
            await asyncio.sleep(0)  # the template's process starts now, before this thread imports the emulation
        if self.broker and not self.worker:  # (a cell without a broker runs no generation: no model)
            started()
        with clock.span("cell"):
            self._cell = Emulation(topo, run_id, backend=self.backend, state_dir=self.state_dir, links=links)
            await self._cell.__aenter__()
        cell: Cell = self._cell
        creds = None
        if self.broker:
            creds = security.make_credentials(run_id, cell.device_ids())
            paths = security.write_security_files(self.state_dir / "secrets", creds, SERVER_ADDRESS, MQTT_PORT,
                                                  watch_port=MQTT_PORT + 1)
            shutil.copy2(paths["observer"], self.state_dir / "observer.json")
            limit = max_message_bytes(topo)
            with clock.span("broker"):  # client ids bound to accounts; watchers on a listener of their own
                await cell.start_broker(BrokerSettings(paths["password_file"], paths["acl_file"], limit,
                                                       watch_password_file=paths["watch_password_file"],
                                                       watch_acl_file=paths["watch_acl_file"]))
            uids = write_agent_configs(self.state_dir, topo, cell, run_id, creds, limit)
            if self._launcher is not None:
                self._launcher.bind(cell, uids)
        write_state(run_id, cell.status() | {"topology": topo.name, "seed": topo.seed})
        if self._worker is not None:
            from testbed.emulation.attached import cell_handlers, control_path
            from testbed.emulation.control import ControlServer

            self.control = ControlServer(control_path(run_id), cell_handlers(cell))
            await self.control.start()  # the worker attaches now
        agents = self._worker if self._worker is not None else self._launcher
        return Rig(run_id, cell, creds, agents, EnergyHistory(self.state_dir), self.state_dir, worker=self._worker)

    async def close(self) -> None:
        if self._launcher is not None:
            await self._launcher.close()
        if self._worker is not None:
            await self._worker.close()
        if self.control is not None:
            await self.control.close()
            self.control = None
        if self._cell is not None:
            try:
                await self._cell.close()
            finally:
                self._cell = None
        if self._owns_state and self.state_dir is not None:
            from testbed.emulation.owned_dirs import remove_owned_dir

            remove_owned_dir(self.state_dir, STATE_ROOT)


def preloaded_variants(topo: Topology, links: list[DeviceLink]) -> list[tuple[str, str]]:
    """The model variants the agent template loads before it forks: the embedded tiny
    model's, shared copy-on-write by every agent. A real model (SD1.5, GBs) is loaded by
    each agent inside its node, where its memory counts against the device's limit."""
    wl = topo.workload
    if wl.model != "tiny":
        return []
    return [(wl.model, p) for p in sorted({lk.precision for lk in links})]


class AttachedCellSource:
    """A cell that `testbed up` keeps alive (its supervisor's agents and broker); left up."""

    path = "attached"
    warm = "none"  # the up cell's worker keeps them warm

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._cell: Any = None

    async def open(self, topo: Topology, links: list[DeviceLink], clock: StartupClock,
                   started: Callable[[], None]) -> Rig:
        from testbed.emulation.attached import AttachedCell, control_path
        from testbed.emulation.runs import run_dir

        started()
        self._cell = cell = await AttachedCell.connect(self.run_id)
        same_cell(self.run_id, topo, links, cell.links)
        if cell.broker is None:
            raise RunFailedError(f"run {self.run_id} was brought up without a broker (--no-broker); "
                                 "bring it up again without that option to run generations on it")
        state = run_dir(self.run_id)
        creds = security.load_credentials(state / "secrets" / "credentials.json")
        return Rig(self.run_id, cell, creds, RemoteAgents(control_path(self.run_id)), EnergyHistory(state), state)

    async def close(self) -> None:
        if self._cell is not None:
            await self._cell.close()  # the connection only: the cell stays up
            self._cell = None


class GivenCell:
    """A cell made elsewhere (a compose/Swarm deployment, seen from its server container):
    its credentials given; its broker started here; its agents the device services'."""

    path = "given"
    warm = "none"  # the deployment's device services start them

    def __init__(self, cell: Cell, credentials: security.RunCredentials, state_dir: Path):
        self.cell, self.credentials, self.state_dir = cell, credentials, Path(state_dir)

    async def open(self, topo: Topology, links: list[DeviceLink], clock: StartupClock,
                   started: Callable[[], None]) -> Rig:
        started()
        secrets = self.state_dir / "secrets"
        watch = secrets / "watch.passwd"  # (a scenario written before watchers had a listener has none)
        await self.cell.start_broker(BrokerSettings(
            secrets / "mosquitto.passwd", secrets / "mosquitto.acl", max_message_bytes(topo),
            watch_password_file=watch if watch.exists() else None,
            watch_acl_file=secrets / "watch.acl" if watch.exists() else None))
        return Rig(self.cell.run_id, self.cell, self.credentials, ExternalAgents(), None, self.state_dir)

    async def close(self) -> None:
        await self.cell.close()


class WorkerCell:
    """The worker's view (worker.py): its owner's cell through the control socket (waited
    for while the owner makes it), the run's credentials and agent uids from the state
    directory, and agents forked by the worker's own template (`launcher`) — or, with no
    launcher (a Swarm cell, whose agents its keepers start on their nodes), its owner's
    agents through the control socket (`RemoteAgents`)."""

    path = "cold"
    warm = "none"  # the worker warms what its `--warm` names

    def __init__(self, run_id: str, launcher: AgentLauncher | None, timeout_s: float = 300.0):
        self.run_id, self.launcher, self.timeout_s = run_id, launcher, timeout_s
        self._cell: Any = None

    async def open(self, topo: Topology, links: list[DeviceLink], clock: StartupClock,
                   started: Callable[[], None]) -> Rig:
        from testbed.emulation.attached import AttachedCell, control_path
        from testbed.emulation.node_uids import read_uids
        from testbed.emulation.runs import run_dir

        started()  # the server's model: torch and diffusers are imported already
        t0, path = time.monotonic(), control_path(self.run_id)
        while not path.exists():  # the owner serves it once the cell, the broker and the configs are made
            if time.monotonic() - t0 > self.timeout_s:
                raise RunFailedError(f"run {self.run_id}: its cell was not made within {self.timeout_s:g} s")
            await asyncio.sleep(0.02)
        clock.mark("attach", time.time())
        self._cell = cell = await AttachedCell.connect(self.run_id)
        same_cell(self.run_id, topo, links, cell.links)
        state = run_dir(self.run_id)
        creds = security.load_credentials(state / "secrets" / "credentials.json")  # after the template's fork
        if self.launcher is None:
            return Rig(self.run_id, cell, creds, RemoteAgents(path), EnergyHistory(state), state)
        self.launcher.bind(cell, read_uids(state))
        return Rig(self.run_id, cell, creds, self.launcher, EnergyHistory(state), state)

    async def close(self) -> None:
        if self.launcher is not None:
            await self.launcher.close()
        if self._cell is not None:
            await self._cell.close()  # the connection only: the owner takes the cell down
            self._cell = None

