"""`Emulation`: the async context manager that owns one run's kernel objects.

`async with Emulation(topology, run_id) as emu:` makes a namespace per node, the links,
the cell's shaping (from radio.compute_links), cgroups per node (from the profiles),
starts mobility when the topology has it, and on exit — also on errors and Ctrl-C —
stops every process it spawned and removes everything again.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from testbed.emulation.backend import SERVER_ADDRESS, NetnsBackend, NodeSpec, check_run_id, device_address
from testbed.emulation.broker import BrokerHandle, start_broker
from testbed.emulation.cgroups import CgroupLimits, Cgroups, detect_cgroups
from testbed.emulation.impair import ImpairedLink, Impairer, ImpairPath
from testbed.emulation.mobility import RandomWaypoint
from testbed.emulation.nsutil import open_iproute
from testbed.emulation.procs import spawn_in, stop_pid
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
from testbed.model.names import SERVER_ID, STATE_ROOT
from testbed.model.impairments import LinkImpairment, device_impairment, link_impairments
from testbed.model.profiles import load_profiles
from testbed.model.radio import DeviceLink, compute_links, link_for_position
from testbed.model.topology import Topology, place

__all__ = ["Emulation", "NodeState", "LinkUpdate", "SERVER_ID", "require_root", "detect_netem"]



def require_root() -> None:
    if os.geteuid() != 0:
        raise ResourceError("the emulation needs root (network namespaces, tc, cgroups); run it with sudo")


@dataclass
class NodeState:
    id: str
    role: str
    netns: str
    address: str
    rate_up_mbps: float | None
    rate_down_mbps: float | None
    cpu_quota_cores: float | None
    memory_mb: int | None
    profile: str
    x_m: float
    y_m: float


@dataclass(frozen=True)
class LinkUpdate:
    """One mobility tick: new positions and rates of every device."""

    t_s: float
    devices: tuple[dict[str, Any], ...]  # {id, x_m, y_m, distance_m, rate_up_mbps, rate_down_mbps}


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


class Emulation:
    def __init__(
        self,
        topology: Topology,
        run_id: str,
        *,
        backend: str = "netns",
        shaping: bool = True,
        cgroups: bool = True,
        mobility: bool = True,
        gso_off: bool = True,
        state_dir: Path | None = None,
        cgroup_impl: Cgroups | None = None,
        impair_path: ImpairPath | None = None,
    ):
        if backend not in ("netns", "docker"):
            raise ResourceError(f"backend {backend!r} is not available here; use --backend netns or docker")
        self.topology = topology
        self.run_id = check_run_id(run_id)
        if backend == "docker":  # containers; docker applies the CPU/memory limits itself
            from testbed.emulation.docker.backend import DockerBackend

            self.backend = DockerBackend(run_id, state_dir=state_dir)
        else:
            self.backend = NetnsBackend(run_id, gso_off=gso_off)
        self.shaping_enabled = shaping
        self.cgroups_enabled = cgroups
        self.mobility_enabled = mobility
        self.state_dir = state_dir
        self._cg_impl = cgroup_impl
        self.cg: Cgroups | None = None
        self.netem = False
        self.impair: Impairer | None = None
        self._impair_path = impair_path  # None: netem where the kernel has it, else nfqueue+iptables
        self.warnings: list[str] = []
        self.nodes: dict[str, NodeState] = {}
        self.links: list[DeviceLink] = []
        self.plan: ShapingPlan | None = None
        self.broker: BrokerHandle | None = None
        self._specs: list[NodeSpec] = []
        self._pids: dict[str, list[int]] = {}
        self._procs: dict[int, Any] = {}  # pid -> Popen (or a backend's Popen-like handle)
        self._mobility_task: asyncio.Task | None = None
        self._subscribers: list[asyncio.Queue[LinkUpdate]] = []
        self._callbacks: list[Callable[[LinkUpdate], None]] = []
        self._shape_lock = asyncio.Lock()
        self.timings_s: dict[str, float] = {}

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
        self.links = compute_links(topo, placement)
        profiles = load_profiles()
        if any(link.id == SERVER_ID for link in self.links):
            raise ResourceError(f"a device may not be called {SERVER_ID!r}: that id names the edge server")
        server_prof = profiles[topo.server.profile]
        self._specs = [NodeSpec(SERVER_ID, "server", SERVER_ADDRESS, -1)] + [
            NodeSpec(link.id, "device", device_address(i), i) for i, link in enumerate(self.links)
        ]
        t0 = time.perf_counter()
        if hasattr(self.backend, "set_limits") and self.cgroups_enabled:
            self.backend.set_limits({SERVER_ID: dict(cpu_cores=server_prof.cpu_cores, memory_mb=server_prof.memory_mb)} | {
                link.id: dict(cpu_cores=profiles[link.profile].cpu_cores, memory_mb=profiles[link.profile].memory_mb,
                              gpu_share_pct=profiles[link.profile].gpu_share_pct) for link in self.links})
        await self.backend.create(self._specs)
        self.timings_s["links_s"] = time.perf_counter() - t0
        self.nodes[SERVER_ID] = NodeState(
            SERVER_ID, "server", self.backend.netns(SERVER_ID), SERVER_ADDRESS, None, None,
            server_prof.cpu_cores if self.cgroups_enabled else None,
            server_prof.memory_mb if self.cgroups_enabled else None,
            server_prof.name, placement.server.x_m, placement.server.y_m,
        )
        for spec, link in zip(self._specs[1:], self.links):
            prof = profiles[link.profile]
            self.nodes[link.id] = NodeState(
                link.id, "device", self.backend.netns(link.id), spec.address,
                link.rate_up_mbps if self.shaping_enabled else None,
                link.rate_down_mbps if self.shaping_enabled else None,
                prof.cpu_cores if self.cgroups_enabled else None,
                prof.memory_mb if self.cgroups_enabled else None,
                link.profile, link.x_m, link.y_m,
            )
        if self.shaping_enabled:
            t0 = time.perf_counter()
            ns, down, up = self.backend.shaping_target()
            self.plan = plan_cell(down, up, self._link_rates(), *self._capacities())
            async with open_iproute(ns) as ipr:
                await apply_plan(ipr, self.plan.ops)
            self.timings_s["shaping_s"] = time.perf_counter() - t0
        if self.cgroups_enabled and not hasattr(self.backend, "set_limits"):
            t0 = time.perf_counter()
            self.cg = self._cg_impl or detect_cgroups()
            for n in self.nodes.values():
                self.cg.create(self.run_id, n.id, CgroupLimits(n.cpu_quota_cores, n.memory_mb))
            self.timings_s["cgroups_s"] = time.perf_counter() - t0
        self.netem = await detect_netem(self.backend.netns(SERVER_ID))
        t0 = time.perf_counter()
        self.impair = Impairer(
            self.run_id, self.backend.netns(SERVER_ID), SERVER_ADDRESS,
            [ImpairedLink(s.id, s.address, self.backend.netns(s.id), s.index) for s in self._specs[1:]],
            self.netem, self.plan, (self.state_dir / "logs" / "delayer.log") if self.state_dir else None,
            self._impair_path)
        await self.impair.apply(link_impairments(topo, self.links), self._rates())
        self.timings_s["impairments_s"] = time.perf_counter() - t0
        if self.mobility_enabled and topo.mobility is not None and self.shaping_enabled:
            self._mobility_task = asyncio.create_task(self._mobility_loop(), name=f"tb-{self.run_id}-mobility")

    async def close(self) -> list[str]:
        """Stop processes, remove namespaces, links and cgroups. Idempotent."""
        problems: list[str] = []
        if self._mobility_task is not None:
            self._mobility_task.cancel()
            with contextlib.suppress(BaseException):
                await self._mobility_task
            self._mobility_task = None
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await self.broker.stop()
            self.broker = None
        if self.impair is not None:  # before the namespaces: the delayer holds a socket in each
            problems += await self.impair.close()
        for node_id in list(self._pids):
            try:
                await self.kill(node_id)
            except Exception as e:  # noqa: BLE001 - collected and reported below
                problems.append(f"kill {node_id}: {e}")
        try:
            await self.backend.destroy()
        except Exception as e:  # noqa: BLE001
            problems.append(f"namespaces: {e}")
        cg = self.cg or (self._cg_impl if self.cgroups_enabled else None)
        if cg is not None:
            try:
                await asyncio.to_thread(cg.remove, self.run_id)
            except Exception as e:  # noqa: BLE001
                problems.append(f"cgroups: {e}")
        if problems:
            raise ResourceError(f"run {self.run_id}: teardown left problems: " + "; ".join(problems))
        return problems

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
            node = self.nodes.get(dev)
            if node is None or node.role != "device":
                raise ShapingError(f"set_link: unknown device {dev!r}; devices: {', '.join(self.device_ids())}")
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

    async def cut_link(self, node_id: str) -> None:
        await self.backend.set_link_state(self._device(node_id).id, False)

    async def restore_link(self, node_id: str) -> None:
        await self.backend.set_link_state(self._device(node_id).id, True)

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

    # processes ---------------------------------------------------------------------
    def device_ids(self) -> list[str]:
        return [n.id for n in self.nodes.values() if n.role == "device"]

    def _device(self, node_id: str) -> NodeState:
        node = self.nodes.get(node_id)
        if node is None:
            raise ResourceError(f"unknown node {node_id!r}; nodes: {', '.join(self.nodes)}")
        return node

    async def spawn(self, node_id: str, argv: Sequence[str], env: dict[str, str] | None = None,
                    log_path: Path | None = None) -> int:
        """Start argv inside the node's namespace and cgroup; returns its pid."""
        node = self._device(node_id)
        procs = self.cg.procs_files(self.run_id, node.id) if self.cg is not None else []
        if hasattr(self.backend, "spawn"):  # docker: `docker exec` inside the node's container
            proc = await self.backend.spawn(node.id, list(argv), env, log_path)
        else:
            proc = await asyncio.to_thread(spawn_in, node.netns, list(argv), env, log_path, procs)
        self._pids.setdefault(node_id, []).append(proc.pid)
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

    async def kill(self, node_id: str) -> None:
        """Stop every process spawned on the node (SIGTERM, then SIGKILL) and any other
        process left in its cgroup."""
        for pid in self._pids.pop(node_id, []):
            await stop_pid(pid)
        if self.cg is not None:
            for pid in self.cg.pids(self.run_id, node_id):
                await stop_pid(pid, timeout_s=1.0)
        if hasattr(self.backend, "kill"):  # docker: what is left in the container's cgroup
            await self.backend.kill(node_id)

    async def start_broker(self, *, password_file: Path | None = None, acl_file: Path | None = None,
                           max_message_bytes: int | None = None, prefer: str = "mosquitto") -> BrokerHandle:
        """Start the MQTT broker in the server namespace (listening on 198.18.0.1:1883)."""
        if self.broker is not None:
            return self.broker
        state = self.state_dir or STATE_ROOT / self.run_id
        procs = tuple(self.cg.procs_files(self.run_id, SERVER_ID)) if self.cg is not None else ()
        self.broker = await start_broker(
            self.backend.netns(SERVER_ID), SERVER_ADDRESS, state / "broker", password_file=password_file,
            acl_file=acl_file, max_message_bytes=max_message_bytes, prefer=prefer, cgroup_procs=procs,
            spawn=(lambda argv, log: self.backend.spawn(SERVER_ID, argv, None, log)) if hasattr(self.backend, "spawn") else None,
        )
        return self.broker

    # reporting ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The `testbed status --json` document."""
        keys = ("id", "role", "netns", "address", "rate_up_mbps", "rate_down_mbps", "cpu_quota_cores")
        cap_up, cap_down = self._capacities() if self.links else (None, None)
        return {
            "run": self.run_id,
            "backend": self.backend.name,
            "netem": self.netem,
            "impairments": self.impair.status() if self.impair is not None else {"path": "none"},
            "warnings": list(self.warnings),
            "host_route": self.backend.host_route,
            "cell": {"shared_capacity": self.topology.cell.shared_capacity,
                     "capacity_up_mbps": cap_up, "capacity_down_mbps": cap_down},
            "mobility": self._mobility_task is not None,
            "broker": None if self.broker is None else {"kind": self.broker.kind, "pid": self.broker.pid,
                                                          "host": self.broker.host, "port": self.broker.port},
            "nodes": [{k: asdict(n)[k] for k in keys} | {"memory_mb": n.memory_mb, "x_m": n.x_m, "y_m": n.y_m}
                      for n in self.nodes.values()],
        }
