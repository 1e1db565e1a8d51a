"""`SwarmCell`: the cell source of a Swarm cluster (`testbed up FILE --backend swarm
--cluster NAME`) — a `MadeCell` whose cell spans the cluster's nodes.

It makes the run's state directory and credentials (the cell broker's accounts as on one
host, and the control plane's: the run owner's and one per device's keeper), one secret
per device (its keeper's account, its agent's config and uid, its link's rates and
downlink impairment), the cell (`SwarmEmulation`: the server and both brokers on the
manager, a keeper per device on its node), then connects the control plane
(`KeeperControl`), through which the cell measures every device's clock and hands its
agent the offset. The agents are the keepers' (`KeeperAgents`); each agent keeps its
MQTT keepalive at 2 s, so that its last will tells the orchestrator of a lost host within
3 s. Everything goes at `close()`.

`worker=True` (the `testbed up` supervisor): as for a `MadeCell`, a worker process
(worker.py, `--remote-agents`) imports torch, loads the server's model and runs the
generations; this process serves it the cell on the control socket (`control`), imports no
torch, and the worker drives the keepers' agents through that socket. Without a worker
(a library session) this process loads the server's model itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.composition.agents import agent_config
from testbed.composition.cells import Rig, max_message_bytes
from testbed.composition.device_clock import SKEW_ENV, SKEWS_ENV, parse_skews
from testbed.composition.history import EnergyHistory
from testbed.composition.keeper import SECRET_PATH
from testbed.composition.keeper_control import KeeperAgents, KeeperControl
from testbed.composition.startup import StartupClock
from testbed.emulation.cell import BrokerSettings
from testbed.model.impairments import link_impairments
from testbed.model.names import CELL_NET, MQTT_PORT, SERVER_ADDRESS, STATE_ROOT
from testbed.model.profiles import load_profiles
from testbed.model.radio import DeviceLink
from testbed.model.topology import Topology
from testbed.relay import security

__all__ = ["SwarmCell", "AGENT_KEEPALIVE_S", "keeper_secret"]

AGENT_KEEPALIVE_S = 2  # the broker publishes a lost agent's will after 1.5 x this
KEEPERS_TIMEOUT_S = 300.0
AGENTS_TIMEOUT_S = 900.0


def keeper_secret(topo: Topology, link: DeviceLink, run_id: str, creds: security.RunCredentials,
                  control: security.ControlCredentials, control_host: str, uid: int, impairment: Any,
                  max_message_bytes: int) -> dict[str, Any]:
    """One device's secret: what its keeper and its agent need, nothing of another device."""
    prof = load_profiles()[link.profile]
    agent = agent_config(topo, link, run_id, creds.for_device(link.id), SERVER_ADDRESS, MQTT_PORT, prof.cpu_cores,
                         max_message_bytes)
    agent = dataclasses.replace(agent, keepalive_s=AGENT_KEEPALIVE_S)
    keeper = control.keepers[link.id]
    return {"run": run_id, "device": link.id, "uid": uid, "cell_subnet": CELL_NET, "server_address": SERVER_ADDRESS,
            "gso_off": True, "agent": dataclasses.asdict(agent),
            "control": {"host": control_host, "port": MQTT_PORT, "username": keeper.username,
                        "password": keeper.password},
            "link": {"up_mbps": link.rate_up_mbps, "down_mbps": link.rate_down_mbps,
                     "down": dataclasses.asdict(impairment.down)}}


class SwarmCell:
    """The cell source (cells.py's protocol) of a Swarm cluster; see the module docstring."""

    path = "cold"
    warm = "none"  # every agent is online once open() returns (each loads its model in its own container)

    def __init__(self, run_id: str | None = None, *, cluster: str, broker: bool = True, state_dir: Path | None = None,
                 worker: bool = False):
        self.run_id, self.cluster, self.broker = run_id, cluster, broker
        self._owns_state, self.state_dir = state_dir is None, state_dir and Path(state_dir)
        self.worker = worker and broker
        self.control: Any = None  # the control socket serving the cell to the worker
        self._cell: Any = None
        self._control: KeeperControl | None = None
        self._worker: Any = None  # WorkerAgents
        self._burials: set[asyncio.Task] = set()

    @staticmethod
    def _secrets(state: Path, run_id: str, ids: list[str]) -> tuple[security.RunCredentials, dict[str, Path],
                                                                     security.ControlCredentials, dict[str, Path]]:
        """Both brokers' accounts and files (secrets/, 0600), and observer.json."""
        creds = security.make_credentials(run_id, ids)
        paths = security.write_security_files(state / "secrets", creds, SERVER_ADDRESS, MQTT_PORT,
                                              watch_port=MQTT_PORT + 1)
        shutil.copy2(paths["observer"], state / "observer.json")
        control = security.make_control_credentials(run_id, ids)
        security.grant_undertaker(paths, control)  # it says "offline" for the devices of a lost node
        return creds, paths, control, security.write_control_files(state / "secrets", control)

    async def open(self, topo: Topology, links: list[DeviceLink], clock: StartupClock,
                   started: Callable[[], None]) -> Rig:
        from testbed.emulation.cluster.swarm_backend import DeviceLaunch
        from testbed.emulation.cluster.swarm_cell import SwarmEmulation
        from testbed.emulation.docker.image import python_bin
        from testbed.emulation.node_uids import deployment_uids
        from testbed.emulation.runs import make_run_dir, new_run_id, write_state, write_topology

        run_id = self.run_id = self.run_id or new_run_id()
        state = self.state_dir = self.state_dir or make_run_dir(run_id)
        write_topology(run_id, topo)
        if self.worker:  # its imports and the server's model overlap the cell's creation
            from testbed.composition.worker_link import WorkerAgents, write_worker_topology

            write_worker_topology(run_id, topo)
            self._worker = WorkerAgents.spawn(run_id, warm="none", remote_agents=True)
        elif self.broker:
            started()
        ids = [lk.id for lk in links]
        creds, paths, control, ctl_paths = self._secrets(state, run_id, ids)
        limit = max_message_bytes(topo)
        uids = deployment_uids(ids)
        impairments = link_impairments(topo, links)
        skews = parse_skews(os.environ.get(SKEWS_ENV))
        by_id = {lk.id: lk for lk in links}

        def launch(spec: Any, host: str, control_host: str) -> DeviceLaunch:
            secret = keeper_secret(topo, by_id[spec.id], run_id, creds, control, control_host, uids[spec.id],
                                   impairments[spec.id], limit)
            env = {"PYTHONUNBUFFERED": "1", "TESTBED_RUN": run_id, "TESTBED_NODE": spec.id, "TESTBED_HOST": host,
                   "OMP_NUM_THREADS": str(max(1, int(spec.cpu_cores or 1)))}
            if spec.id in skews:
                env[SKEW_ENV] = repr(skews[spec.id])
            return DeviceLaunch([python_bin(), "-m", "testbed.composition.keeper", SECRET_PATH], env,
                                json.dumps(secret).encode())

        with clock.span("cell"):
            self._cell = cell = SwarmEmulation(
                topo, run_id, cluster=self.cluster, launch=launch, state_dir=state, links=links,
                placement=topo.placements(), control_settings=BrokerSettings(ctl_paths["password_file"],
                                                                             ctl_paths["acl_file"]))
            await cell.__aenter__()
        if self.broker:  # the cell's, as on one host: client ids bound to accounts, watchers on their listener
            settings = BrokerSettings(paths["password_file"], paths["acl_file"], limit, MQTT_PORT, "mosquitto",
                                      paths["watch_password_file"], paths["watch_acl_file"])
            with clock.span("broker"):
                await cell.start_broker(settings)
        t0 = time.time()
        self._control = KeeperControl(run_id, control, cell.control_address, MQTT_PORT,
                                      cell.nodes["server"].netns, cell.keeper_seen)
        cell.bind_control(self._control)  # before the keepers' retained states arrive
        if self.broker:
            cell.on_lost(lambda devices: self._bury(cell, devices))
        await self._control.start()
        await cell.wait_synced(KEEPERS_TIMEOUT_S)  # every device shaped, its keeper connected, its clock measured
        clock.mark("control", t0)
        if self.broker:
            t0 = time.time()
            await self._agents_online(cell, creds, limit)
            clock.mark("agents_start", t0)
        write_state(run_id, cell.status() | {"topology": topo.name, "seed": topo.seed})
        agents = KeeperAgents(cell) if self.broker else None
        if self._worker is not None:
            from testbed.emulation.attached import cell_handlers, control_path
            from testbed.emulation.control import ControlServer

            self.control = ControlServer(control_path(run_id), cell_handlers(cell))
            await self.control.start()  # the worker attaches now
        return Rig(run_id, cell, creds if self.broker else None, agents, EnergyHistory(state), state,
                   worker=self._worker)

    def _bury(self, cell: Any, devices: list[str]) -> None:
        """Their node is gone: "offline" for them now (the orchestrator recovers at once)."""
        if self._control is None or cell.broker is None:
            return
        task = asyncio.get_running_loop().create_task(self._control.bury(devices, cell.broker.host, cell.broker.port))
        self._burials.add(task)

        def done(t: asyncio.Task) -> None:
            self._burials.discard(t)
            if not t.cancelled() and t.exception() is not None:
                cell.warnings.append(f"could not say offline for {', '.join(devices)}: {t.exception()}")

        task.add_done_callback(done)

    @staticmethod
    async def _agents_online(cell: Any, creds: security.RunCredentials, limit: int) -> None:
        """Until every agent is online: each imports torch and loads its model in its own
        container (no template shares that work across hosts), minutes on a busy machine —
        longer than a generation's wait for agents allows."""
        from testbed.composition.ns_loop import run_in_netns
        from testbed.composition.online import wait_online
        from testbed.errors import RunFailedError
        from testbed.relay.orchestrator import RelaySettings

        assert creds.monitor is not None and cell.broker is not None
        rs = RelaySettings(cell.run_id, cell.broker.host, cell.broker.settings.watch_port, creds.monitor.username,
                           creds.monitor.password, limit)
        deadline = time.monotonic() + AGENTS_TIMEOUT_S
        while True:
            try:
                await run_in_netns(cell.nodes["server"].netns, lambda: wait_online(rs, cell.device_ids()))
                return
            except RunFailedError:
                if time.monotonic() > deadline:
                    raise

    async def close(self) -> None:
        """The control connection, then the cell (services, server, networks, secrets), then
        the run's state directory when this source made it — each also when one before failed."""
        from testbed.emulation.owned_dirs import remove_owned_dir

        control, self._control = self._control, None
        cell, self._cell = self._cell, None
        worker, self._worker = self._worker, None
        server, self.control = self.control, None
        try:
            if worker is not None:
                await worker.close()
            if server is not None:
                await server.close()
            if control is not None:
                await control.close()
        finally:
            try:
                if cell is not None:
                    await cell.close()
            finally:
                if self._owns_state and self.state_dir is not None:
                    remove_owned_dir(self.state_dir, STATE_ROOT)
