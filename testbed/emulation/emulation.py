"""`Emulation`: the `Cell` this process makes, on the netns or the docker backend.

`async with Emulation(topology, run_id) as emu:` makes a node per device and the edge
server (namespaces or containers, by the backend), their links, the cell's shaping (from
radio.compute_links), the nodes' CPU/memory limits (from the profiles), starts mobility
when the topology has it, and on exit — also on errors and Ctrl-C — stops every process
in its nodes and removes everything again. The backend is a parameter: shaping, mobility,
node states and the broker are the same code on both. Where the host has a GPU, devices
whose profile has a GPU share get it through the cell's CUDA MPS daemon (gpu.py): in the
environment that `join` and `spawn` give their processes; `status()["gpu"]` says whether
GPU limits apply, and why not.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from testbed.emulation import host_firewall
from testbed.emulation.backend import DEVICE_PIDS_MAX, Backend, NetnsBackend, NodeSpec, device_address
from testbed.emulation.broker import BrokerHandle, broker_status, start_broker
from testbed.emulation.cell import BrokerSettings, LinkUpdate, NodeJoin, NodeState, restart_broker
from testbed.emulation.cgroups import Cgroups
from testbed.emulation.gpu import CellGpu
from testbed.emulation.impair import ImpairedLink, Impairer, ImpairPath
from testbed.emulation.mobility import RandomWaypoint
from testbed.emulation.nsutil import open_iproute
from testbed.emulation.procs import stop_pid
from testbed.emulation.shaping import (
    HtbClass,
    LinkRate,
    ShapingPlan,
    apply_plan,
    change_rates,
    diff_plan,
    plan_cell,
    plan_rates,
    read_back,
)
from testbed.errors import ResourceError, ShapingError
from testbed.model.impairments import LinkImpairment, device_impairment, link_impairments
from testbed.model.names import SERVER_ADDRESS, SERVER_ID, check_run_id
from testbed.model.profiles import load_profiles
from testbed.model.radio import DeviceLink, compute_links, link_for_position
from testbed.model.topology import Topology, place

__all__ = ["Emulation", "NodeState", "LinkUpdate", "SERVER_ID", "require_root", "detect_netem", "make_backend"]


def require_root() -> None:
    if os.geteuid() != 0:
        raise ResourceError("the emulation needs root (network namespaces, tc, cgroups); run it with sudo")


async def detect_netem(netns: str) -> bool:
    """True when the kernel can make a netem qdisc (tried on `lo` of `netns`, then removed)."""
    async with open_iproute(netns) as ipr:
        lo = (await ipr.link_lookup(ifname="lo"))[0]
        try:
            await ipr.tc("add", "netem", lo, 0x10000, delay=1000)
        except NetlinkError:
            return False
        with contextlib.suppress(NetlinkError):
            await ipr.tc("del", index=lo, handle=0x10000, parent=0xFFFFFFFF)
        return True


def _key(op: object) -> tuple:
    """Identity of a shaping op across rate changes (interface + handle)."""
    if isinstance(op, HtbClass):
        return ("class", op.ifname, op.classid)
    return (type(op).__name__, getattr(op, "ifname", None), getattr(op, "handle", None), id(op) if not hasattr(op, "handle") else 0)


def make_backend(name: str, run_id: str, *, gso_off: bool = True, limits: bool = True,
                 cgroups: Cgroups | None = None, state_dir: Path | None = None, cluster: str | None = None,
                 **swarm: Any) -> Backend:
    """The backend called `name` ("netns", "docker", or "swarm" on `cluster`, whose
    `placement` and `launch` come in `swarm`: see emulation/cluster/swarm_backend.py; its
    cell is a `SwarmEmulation`, whose devices shape their own links)."""
    if name == "netns":
        return NetnsBackend(run_id, gso_off=gso_off, cgroups=cgroups, limits=limits)
    if name == "docker":
        from testbed.emulation.docker.backend import DockerBackend

        return DockerBackend(run_id, state_dir=state_dir, gso_off=gso_off, limits=limits)
    if name == "swarm":
        if not cluster:
            raise ResourceError("the swarm backend needs a cluster (`testbed cluster up`, then --cluster NAME)")
        from testbed.emulation.cluster.swarm_backend import SwarmBackend

        return SwarmBackend(run_id, cluster, state_dir=state_dir, gso_off=gso_off, limits=limits, **swarm)
    raise ResourceError(f"backend {name!r} is not available here; use --backend netns, docker or swarm")


class Emulation:
    """The `Cell` (emulation/cell.py) that this process makes and owns."""

    def __init__(
        self,
        topology: Topology,
        run_id: str,
        *,
        backend: str | Backend = "netns",
        shaping: bool = True,
        cgroups: bool = True,
        mobility: bool = True,
        gso_off: bool = True,
        state_dir: Path | None = None,
        cgroup_impl: Cgroups | None = None,
        impair_path: ImpairPath | None = None,
        links: list[DeviceLink] | None = None,
    ):
        self.topology = topology
        self._given_links = links  # computed by the caller from this topology (the run owner computes them once)
        self.run_id = check_run_id(run_id)
        self.backend: Backend = backend if not isinstance(backend, str) else make_backend(
            backend, run_id, gso_off=gso_off, limits=cgroups, cgroups=cgroup_impl, state_dir=state_dir)
        self.shaping_enabled = shaping
        self.limits_enabled = cgroups
        self.mobility_enabled = mobility
        self.state_dir = state_dir  # None: the run's own directory, made (marked ours) when needed
        self.netem = False
        self.impair: Impairer | None = None
        self._impair_path = impair_path  # None: netem where the kernel has it, else nfqueue+iptables
        self.warnings: list[str] = []
        self.nodes: dict[str, NodeState] = {}
        self.links: list[DeviceLink] = []
        self.plan: ShapingPlan | None = None
        self._broker: BrokerHandle | None = None
        self.gpu: CellGpu | None = None
        self.broker_error: str | None = None  # why the last start (or restart) of the broker failed
        self._firewall: asyncio.Future | None = None  # the making of the host's per-run chain (host_firewall.py)
        self._specs: list[NodeSpec] = []
        self._procs: dict[int, Any] = {}  # pid -> Popen (or a backend's Popen-like handle)
        self._mobility_task: asyncio.Task | None = None
        self._subscribers: list[asyncio.Queue[LinkUpdate]] = []
        self._callbacks: list[Callable[[LinkUpdate], None]] = []
        self._shape_lock = asyncio.Lock()
        self.timings_s: dict[str, float] = {}

    @property
    def backend_name(self) -> str:
        return self.backend.name

    # lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> Emulation:
        require_root()
        try:
            await self._up()
        except BaseException:
            await asyncio.shield(self.close())
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.shield(self.close())

    async def _up(self) -> None:
        topo = self.topology
        placement = place(topo)
        self.links = list(self._given_links) if self._given_links is not None else compute_links(topo, placement)
        profiles = load_profiles()
        if any(link.id == SERVER_ID for link in self.links):
            raise ResourceError(f"a device may not be called {SERVER_ID!r}: that id names the edge server")
        server_prof = profiles[topo.server.profile]
        lim = self.limits_enabled
        self.gpu = await CellGpu.make({link.id: profiles[link.profile].gpu_share_pct for link in self.links},
                                      lim, self.backend.gpu_problem)
        if self.gpu.plan.applies:  # its pipe directory exists before a container mounts it
            from testbed.emulation.runs import ensure_run_dir

            await self.gpu.start(self.state_dir or ensure_run_dir(self.run_id))
        self._specs = [NodeSpec(SERVER_ID, "server", SERVER_ADDRESS, -1, server_prof.cpu_cores if lim else None,
                                server_prof.memory_mb if lim else None)] + [
            NodeSpec(link.id, "device", device_address(i), i,
                     profiles[link.profile].cpu_cores if lim else None, profiles[link.profile].memory_mb if lim else None,
                     profiles[link.profile].gpu_share_pct if lim else None, tuple(sorted(self.gpu.env(link.id).items())),
                     DEVICE_PIDS_MAX if lim else None)
            for i, link in enumerate(self.links)
        ]
        t0 = time.perf_counter()
        await self.backend.create(self._specs)
        self.timings_s["nodes_s"] = time.perf_counter() - t0
        self._firewall = asyncio.ensure_future(host_firewall.install(self.run_id, self.backend.host_ifname))
        if lim and self.backend.pids_limit is None:
            self.warnings.append(f"no pids controller on this host: a device may start processes up to the host's "
                                 f"limit (its {DEVICE_PIDS_MAX} are not enforced)")
        self.nodes[SERVER_ID] = NodeState(
            SERVER_ID, "server", self.backend.netns(SERVER_ID), SERVER_ADDRESS, None, None,
            self._specs[0].cpu_cores, self._specs[0].memory_mb, server_prof.name,
            placement.server.x_m, placement.server.y_m,
        )
        for spec, link in zip(self._specs[1:], self.links):
            self.nodes[link.id] = NodeState(
                link.id, "device", self.backend.netns(link.id), spec.address,
                link.rate_up_mbps if self.shaping_enabled else None,
                link.rate_down_mbps if self.shaping_enabled else None,
                spec.cpu_cores, spec.memory_mb, link.profile, link.x_m, link.y_m,
            )
        if self.shaping_enabled:
            t0 = time.perf_counter()
            ns, down, up = self.backend.shaping_target()
            self.plan = plan_cell(down, up, self._link_rates(), *self._capacities())
            async with open_iproute(ns) as ipr:
                await apply_plan(ipr, self.plan.ops)
            self.timings_s["shaping_s"] = time.perf_counter() - t0
        self.netem = await detect_netem(self.backend.netns(SERVER_ID))
        t0 = time.perf_counter()
        self.impair = Impairer(
            self.run_id, self.backend.netns(SERVER_ID), SERVER_ADDRESS,
            [ImpairedLink(s.id, s.address, self.backend.netns(s.id), s.index) for s in self._specs[1:]],
            self.netem, self.plan, (self.state_dir / "logs" / "delayer.log") if self.state_dir else None,
            self._impair_path)
        await self.impair.apply(link_impairments(topo, self.links), self._rates())
        self.timings_s["impairments_s"] = time.perf_counter() - t0
        await self._firewall  # made beside the shaping: a device reaches nothing on the host from here on
        if self.mobility_enabled and topo.mobility is not None and self.shaping_enabled:
            self._mobility_task = asyncio.create_task(self._mobility_loop(), name=f"tb-{self.run_id}-mobility")

    async def close(self) -> None:
        """Stop processes, remove nodes, links and cgroups. Idempotent."""
        problems: list[str] = []
        if self._mobility_task is not None:
            self._mobility_task.cancel()
            with contextlib.suppress(BaseException):
                await self._mobility_task
            self._mobility_task = None
        await self.stop_broker()
        if self.impair is not None:  # before the namespaces: the delayer holds a socket in each
            problems += await self.impair.close()
        if self._firewall is not None:
            with contextlib.suppress(BaseException):  # a failed install: its error was the start's
                await self._firewall
            try:
                await host_firewall.remove(self.run_id)
                self._firewall = None
            except Exception as e:  # noqa: BLE001 - collected and reported below
                problems.append(f"host firewall: {e}")
        for node_id in list(self.nodes):
            try:
                await self._stop_processes(node_id)
            except Exception as e:  # noqa: BLE001 - collected and reported below
                problems.append(f"kill {node_id}: {e}")
        if self.gpu is not None:  # after its clients
            problems += await self.gpu.close()
        try:
            await self.backend.destroy()
        except Exception as e:  # noqa: BLE001
            problems.append(f"nodes: {e}")
        self._procs.clear()
        if problems:
            raise ResourceError(f"run {self.run_id}: teardown left problems: " + "; ".join(problems))

    # links -------------------------------------------------------------------------
    def _capacities(self) -> tuple[float | None, float | None]:
        cell = self.topology.cell
        if not cell.shared_capacity:
            return None, None
        # Default capacity: the cell's best link, i.e. what one device alone could use.
        up = cell.capacity_up_mbps or max(link.rate_up_mbps for link in self.links)
        down = cell.capacity_down_mbps or max(link.rate_down_mbps for link in self.links)
        return up, down

    def _link_rates(self) -> list[LinkRate]:
        return [
            LinkRate(n.id, n.address, n.rate_up_mbps, n.rate_down_mbps)  # type: ignore[arg-type]
            for n in self.nodes.values() if n.role == "device"
        ]

    async def set_links(self, rates: dict[str, tuple[float, float]]) -> None:
        """Change several devices' (up, down) rates at once, live (TCP survives)."""
        if self.plan is None:
            raise ShapingError("shaping is off in this emulation; nothing to change")
        for dev, (up, down) in rates.items():
            self._device(dev)
            if not (up > 0 and down > 0 and math.isfinite(up) and math.isfinite(down)):
                raise ShapingError(f"set_link {dev}: rates must be finite and > 0 Mbit/s (got up {up}, down {down})")
        async with self._shape_lock:
            for dev, (up, down) in rates.items():
                self.nodes[dev].rate_up_mbps, self.nodes[dev].rate_down_mbps = up, down
            ns, down_if, up_if = self.backend.shaping_target()
            new = plan_rates(down_if, up_if, self._link_rates(), self.plan.classes, *self._capacities())
            old = set(self.plan.ops)
            changed = [c for c in new if c not in old]
            async with open_iproute(ns) as ipr:
                await change_rates(ipr, changed)
            keyed = {_key(c): c for c in new}
            self.plan = ShapingPlan(self.plan.down_ifname, self.plan.up_ifname,
                                    tuple(keyed.get(_key(op), op) for op in self.plan.ops), self.plan.classes)
            if self.impair is not None:
                await self.impair.after_rate_change(self._rates(), self.plan)

    async def set_link(self, device_id: str, up_mbps: float, down_mbps: float) -> None:
        await self.set_links({device_id: (up_mbps, down_mbps)})

    def _rates(self) -> dict[str, tuple[float, float]]:
        return {n.id: (n.rate_up_mbps, n.rate_down_mbps) for n in self.nodes.values()  # type: ignore[misc]
                if n.role == "device" and n.rate_up_mbps is not None}

    @property
    def impairments(self) -> dict[str, LinkImpairment]:
        """Every device's impairments as applied now (delay, jitter, loss per direction)."""
        current = self.impair.current if self.impair is not None else {}
        return {dev: current.get(dev, LinkImpairment()) for dev in self.device_ids()}

    async def set_impairments(self, impairments: dict[str, LinkImpairment]) -> None:
        """Change several devices' delay, jitter and loss live (per direction)."""
        for dev in impairments:
            self._device(dev)
        assert self.impair is not None, "the emulation is not up"
        async with self._shape_lock:
            await self.impair.apply(impairments, self._rates())

    async def set_impairment(self, device_id: str, delay_ms: float, jitter_ms: float = 0.0,
                             loss_pct: float = 0.0) -> None:
        """One device's delay, jitter and loss, the same in both directions."""
        if not (0 <= jitter_ms <= delay_ms <= 10_000 and 0 <= loss_pct < 100):
            raise ResourceError(f"set_impairment {device_id}: need 0 <= jitter_ms <= delay_ms <= 10000 and "
                                f"0 <= loss_pct < 100 (got {delay_ms}, {jitter_ms}, {loss_pct})")
        await self.set_impairments({device_id: LinkImpairment.symmetric(delay_ms, jitter_ms, loss_pct)})

    async def read_back(self) -> list:
        ns, down, up = self.backend.shaping_target()
        async with open_iproute(ns) as ipr:
            return await read_back(ipr, [down, up])

    async def verify_shaping(self) -> list[str]:
        """Differences between the plan and the kernel (empty = as planned)."""
        if self.plan is None:
            return []
        planned = self.impair.shaping_ops_in_kernel(self.plan.ops) if self.impair else self.plan.ops
        return diff_plan(planned, await self.read_back()) + (await self.impair.verify() if self.impair else [])

    async def cut_link(self, device_id: str) -> None:
        node = self._device(device_id)
        await self.backend.set_link_state(node.id, False)
        if node.state == "up":
            node.state = "down"

    async def restore_link(self, device_id: str) -> None:
        node = self._device(device_id)
        await self.backend.set_link_state(node.id, True)
        if node.state == "down":
            node.state = "up"

    # mobility ----------------------------------------------------------------------
    def subscribe(self, maxsize: int = 16) -> asyncio.Queue[LinkUpdate]:
        """A queue that receives every mobility tick (oldest dropped when full)."""
        q: asyncio.Queue[LinkUpdate] = asyncio.Queue(maxsize)
        self._subscribers.append(q)
        return q

    def on_update(self, callback: Callable[[LinkUpdate], None]) -> None:
        self._callbacks.append(callback)

    async def updates(self) -> AsyncIterator[LinkUpdate]:
        q = self.subscribe()
        try:
            while True:
                yield await q.get()
        finally:
            self._subscribers.remove(q)

    async def _mobility_loop(self) -> None:
        cfg = self.topology.mobility
        assert cfg is not None
        by_id = {link.id: link for link in self.links}
        walk = RandomWaypoint(cfg, self.topology.area, self.topology.seed,
                              {link.id: (link.x_m, link.y_m) for link in self.links})
        server = self.nodes[SERVER_ID]
        t0 = time.monotonic()
        while True:
            await asyncio.sleep(cfg.interval_s)
            positions = walk.step(cfg.interval_s)
            rates: dict[str, tuple[float, float]] = {}
            impaired: dict[str, LinkImpairment] = {}
            rows = []
            for dev, (x, y) in positions.items():
                d = math.hypot(x - server.x_m, y - server.y_m)
                link = by_id[dev]
                _, snr_up, snr_down, up, down = link_for_position(self.topology.radio, d, link.los, link.shadowing_db)
                rates[dev] = (up, down)
                impaired[dev] = device_impairment(self.topology, dev, snr_up, snr_down)
                self.nodes[dev].x_m, self.nodes[dev].y_m = x, y
                rows.append({"id": dev, "x_m": x, "y_m": y, "distance_m": d, "rate_up_mbps": up, "rate_down_mbps": down})
            await self.set_links(rates)
            if self.topology.links is not None and self.topology.links.impairments == "radio":
                await self.set_impairments(impaired)  # fixed ones do not move (and faults' changes stay)
            update = LinkUpdate(time.monotonic() - t0, tuple(rows))
            for q in self._subscribers:
                if q.full():
                    q.get_nowait()
                q.put_nowait(update)
            for cb in self._callbacks:
                cb(update)

    # compute and processes ---------------------------------------------------------
    def device_ids(self) -> list[str]:
        return [n.id for n in self.nodes.values() if n.role == "device"]

    async def refresh(self) -> None:
        """This process owns the cell: `nodes` is always current."""

    def _device(self, node_id: str) -> NodeState:
        node = self.nodes.get(node_id)
        if node is None or node.role != "device":
            raise ResourceError(f"unknown device {node_id!r}; devices: {', '.join(self.device_ids())}")
        return node

    def _node(self, node_id: str) -> NodeState:
        node = self.nodes.get(node_id)
        if node is None:
            raise ResourceError(f"unknown node {node_id!r}; nodes: {', '.join(self.nodes)}")
        return node

    async def set_cpu(self, node_id: str, cpu_cores: float) -> None:
        """Change the node's CPU quota live (cgroup or `docker update --cpus`)."""
        node = self._node(node_id)
        if not (cpu_cores > 0 and math.isfinite(cpu_cores)):
            raise ResourceError(f"set_cpu {node_id}: cores must be finite and > 0 (got {cpu_cores})")
        await self.backend.set_cpu(node.id, cpu_cores)
        node.cpu_quota_cores = cpu_cores

    def _gpu_env(self, node_id: str) -> dict[str, str]:
        return self.gpu.env(node_id) if self.gpu is not None else {}

    async def join(self, node_id: str) -> NodeJoin:
        j = self.backend.join(self._node(node_id).id)
        return dataclasses.replace(j, env={**j.env, **self._gpu_env(node_id)})

    async def spawn(self, node_id: str, argv: Sequence[str], env: dict[str, str] | None = None,
                    log_path: Path | None = None) -> int:
        """Start argv inside the node (its namespace and cgroups, or its container; its GPU
        share's environment); returns its pid."""
        env = {**self._gpu_env(node_id), **(env or {})}
        proc = await self.backend.spawn(self._node(node_id).id, list(argv), env, log_path)
        self._procs[proc.pid] = proc
        return proc.pid

    async def returncode(self, pid: int) -> int | None:
        """Exit status of a process started by spawn(); None while it runs."""
        proc = self._procs.get(pid)
        if proc is None:
            raise ResourceError(f"pid {pid} was not started by this emulation's spawn()")
        return proc.poll()

    async def wait(self, pid: int, timeout_s: float) -> int:
        """Wait (bounded) for a spawned process to exit; returns its exit status."""
        async with asyncio.timeout(timeout_s):
            while (rc := await self.returncode(pid)) is None:
                await asyncio.sleep(0.05)
        return rc

    async def _stop_processes(self, node_id: str) -> None:
        for pid in sorted(self.backend.pids(node_id)):
            await stop_pid(pid, timeout_s=1.0)

    async def kill(self, node_id: str) -> None:
        """Stop every process in the node (SIGTERM, then SIGKILL); it is `killed` until revived."""
        node = self._node(node_id)
        await self._stop_processes(node.id)
        node.state = "killed"

    async def revive(self, node_id: str) -> None:
        """The node is `up` again (its link restored if it was cut); what runs in it is the caller's."""
        node = self._node(node_id)
        if node.role == "device":
            await self.backend.set_link_state(node.id, True)
        node.state = "up"

    # broker ------------------------------------------------------------------------
    @property
    def broker(self) -> BrokerHandle | None:
        return self._broker

    async def start_broker(self, settings: BrokerSettings | None = None) -> BrokerHandle:
        """Start the MQTT broker in the server node (listening on 198.18.0.1); one at a time."""
        if self._broker is not None:
            return self._broker
        from testbed.emulation.runs import ensure_run_dir

        server = self.nodes[SERVER_ID]
        state = self.state_dir or ensure_run_dir(self.run_id)  # marked ours: `testbed down` may remove it
        try:
            self._broker = await start_broker(
                server.netns, SERVER_ADDRESS, state / "broker", settings or BrokerSettings(),
                spawn=lambda argv, log, run_as: self.backend.spawn(SERVER_ID, argv, None, log, run_as=run_as),
            )
        except Exception as e:
            self.broker_error = str(e)  # the status says the broker is down, and why
            raise
        self.broker_error = None
        return self._broker

    async def stop_broker(self) -> None:
        if self._broker is not None:
            handle, self._broker = self._broker, None
            with contextlib.suppress(Exception):
                await handle.stop()

    async def restart_broker(self, down_s: float = 0.0) -> BrokerHandle:
        """Stop the broker, wait `down_s`, start it again with the same settings."""
        return await restart_broker(self, down_s)

    # reporting ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The `testbed status --json` document."""
        cap_up, cap_down = self._capacities() if self.links else (None, None)
        return {
            "run": self.run_id,
            "backend": self.backend.name,
            "netem": self.netem,
            "impairments": self.impair.status() if self.impair is not None else {"path": "none"},
            "warnings": list(self.warnings),
            "host_route": self.backend.host_route,
            "host_firewall": host_firewall.chain_name(self.run_id) if self._firewall is not None else None,
            "pids_limit": {"per_device": DEVICE_PIDS_MAX, "by": self.backend.pids_limit}
            if self.limits_enabled and self.backend.pids_limit else None,
            "cell": {"shared_capacity": self.topology.cell.shared_capacity,
                     "capacity_up_mbps": cap_up, "capacity_down_mbps": cap_down},
            "mobility": self._mobility_task is not None,
            "gpu": self.gpu.status() if self.gpu is not None else {"limits_applied": False, "why": "the cell is not up"},
            **broker_status(self._broker, self.broker_error),
            "nodes": [n.to_json() for n in self.nodes.values()],
        }
