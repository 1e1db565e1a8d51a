"""`SwarmEmulation`: the `Cell` of a Swarm cluster — the edge server and its broker on the
manager, each device on its node (swarm_backend.py), every device shaping and impairing
its own link (device_link.py, run by its keeper) on the run owner's command.

It is an `Emulation` (the broker, mobility, node states, CPU limits and the status are
the same code) whose links and device processes are reached through a `DeviceControl`:
the run owner's client of the cell's control broker (composition/keeper_control.py), a
second mosquitto in the server container on the control network that only the run owner
and the keepers can log in to. What the one-host code does from the server's namespace
is asked of each device's keeper instead: rates (`rates`), the downlink's delay and loss
(`impair`), a cut link (`cut`/`restore`), stopping its agent (`kill`). The uplink's
delay and loss are applied where its packets are received, in the server's namespace
(on the manager's host, as on one host).

Clocks: each device's offset from the run owner's clock is measured NTP-style over the
control plane whenever its keeper (re)connects (`clock`, the sample with the shortest
round trip) and handed to its agent (`offset`), whose timestamps are then on the run
owner's clock: t_down, t_cmp and t_up never mix two hosts' clocks. Losing a node: its
devices are `down` once its daemon is gone (this machine: at once; elsewhere: the
manager's heartbeat) or their keepers' wills arrive; when Swarm restarts their tasks on
the returned node, the keepers reconnect and each device is brought back to the cell's
current rates, impairments and clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol

from testbed.emulation.broker import BrokerHandle, start_broker
from testbed.emulation.cell import BrokerSettings, LinkUpdate, NodeState
from testbed.emulation.cluster.swarm_backend import Launch, SwarmBackend
from testbed.emulation.emulation import Emulation
from testbed.emulation.backend import DEVICE_PIDS_MAX, NodeSpec, device_address
from testbed.emulation.impair import CHAIN, CONGESTION_CONTROL, chain_rules, remove_chain_rules
from testbed.emulation.gpu import CellGpu
from testbed.emulation.nsutil import in_netns
from testbed.errors import ResourceError
from testbed.model.impairments import Impairment, LinkImpairment, link_impairments
from testbed.model.names import SERVER_ADDRESS, SERVER_ID
from testbed.model.profiles import load_profiles
from testbed.model.radio import DeviceLink, compute_links
from testbed.model.topology import Topology, place

__all__ = ["DeviceControl", "SwarmEmulation", "ClockSample", "best_offset", "CLOCK_SAMPLES", "UplinkImpairer"]

CLOCK_SAMPLES = 15
_CLOCK_GAP_S = 0.01  # between probes: a quiet moment among them has the shortest round trip
_HEALTH_S = 0.5


class DeviceControl(Protocol):
    """The run owner's line to the devices' keepers (one op, one reply)."""

    async def call(self, device: str, op: str, timeout_s: float = 10.0, **args: Any) -> dict[str, Any]: ...
    async def sample_clock(self, device: str) -> tuple[float, float, float]:
        """(the run owner's clock when the `clock` op left, the device's clock in the reply,
        the run owner's clock when the reply came), both read next to the wire."""
        ...
    async def close(self) -> None: ...


@dataclass(frozen=True)
class ClockSample:
    t_send: float  # the run owner's clock when it asked
    t_device: float  # the device's clock when it answered
    t_recv: float  # the run owner's clock when the answer came

    @property
    def rtt_s(self) -> float:
        return self.t_recv - self.t_send

    @property
    def offset_s(self) -> float:
        """device - run owner, assuming the answer was read half way through the round trip."""
        return self.t_device - (self.t_send + self.t_recv) / 2


def best_offset(samples: list[ClockSample]) -> ClockSample:
    """The sample with the shortest round trip (its error is at most half of it). Pure."""
    if not samples:
        raise ResourceError("no clock sample")
    return min(samples, key=lambda s: s.rtt_s)


def _iptables_in(netns: str, text: str) -> None:
    r = subprocess.run(["nsenter", f"--net={netns}", "iptables-restore", "--noflush"], input=text.encode(),
                       capture_output=True, timeout=30)
    if r.returncode != 0:
        raise ResourceError(f"iptables in the server container: {r.stderr.decode(errors='replace').strip()}")


class UplinkImpairer:
    """The uplinks' delay and loss in the server's namespace (receiver side, as on one host)."""

    def __init__(self, run_id: str, netns: str, log_path: Path | None):
        self.run_id, self.netns, self.log_path = run_id, netns, log_path
        self.rules: dict[str, tuple[str, Impairment, int]] = {}  # device -> (address, impairment, queue)
        self._delayer: Any = None
        self._queues: set[int] = set()
        self._hooked = False

    async def apply(self, changes: dict[str, tuple[str, Impairment, int]]) -> None:
        """Set these devices' uplink impairments: device -> (its address, impairment, queue)."""
        for _dev, (_addr, one, queue) in changes.items():
            if one.delay_ms > 0 or one.jitter_ms > 0 or queue in self._queues:
                await asyncio.to_thread(self._queue, queue, one)
        self.rules.update(changes)
        live = [r for r in self.rules.values() if not r[1].is_zero]
        if live or self._hooked:
            await asyncio.to_thread(_iptables_in, self.netns, chain_rules(live, hook=not self._hooked))
            self._hooked = True

    def _queue(self, queue: int, one: Impairment) -> None:
        from testbed.emulation.delayer import DelayerHandle

        if self._delayer is None:
            self._delayer = DelayerHandle(self.run_id, str(self.log_path) if self.log_path else None)
        self._delayer.queue("set" if queue in self._queues else "add", self.netns, queue, one.delay_ms, one.jitter_ms)
        self._queues.add(queue)

    async def close(self) -> None:
        if self._delayer is not None:
            await asyncio.to_thread(self._delayer.stop)
            self._delayer = None
        if self._hooked:
            with contextlib.suppress(ResourceError, OSError):
                await asyncio.to_thread(_iptables_in, self.netns, remove_chain_rules())
        self.rules.clear()
        self._hooked = False


class SwarmEmulation(Emulation):
    """See the module docstring. `launch` says what each device's container runs;
    `control_settings` are the control broker's (password and ACL files)."""

    def __init__(self, topology: Topology, run_id: str, *, cluster: str, launch: Launch, state_dir: Path,
                 control_settings: BrokerSettings, placement: dict[str, str] | None = None,
                 links: list[DeviceLink] | None = None, limits: bool = True, backend: SwarmBackend | None = None):
        if backend is None:
            from testbed.emulation.emulation import make_backend

            backend = make_backend("swarm", run_id, cluster=cluster, state_dir=state_dir, limits=limits,
                                   placement=placement, launch=launch)  # type: ignore[assignment]
        super().__init__(topology, run_id, backend=backend, state_dir=state_dir, links=links, cgroups=limits)
        self.swarm: SwarmBackend = backend
        self.cluster = cluster
        self.control: DeviceControl | None = None
        self.control_settings = control_settings
        self.control_broker: BrokerHandle | None = None
        self.uplinks: UplinkImpairer | None = None
        self._current: dict[str, LinkImpairment] = {}
        self._cut: set[str] = set()
        self._lost: set[str] = set()  # devices whose node or keeper is gone
        self._buried: set[str] = set()  # devices whose node is down (told to on_lost's callbacks)
        self._keeper_ready: dict[str, bool] = {}
        self._sync_locks: dict[str, asyncio.Lock] = {}
        self._health: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.node_states: dict[str, str] = {}
        self._lost_callbacks: list[Callable[[list[str]], None]] = []

    # lifecycle ---------------------------------------------------------------------
    async def _up(self) -> None:
        topo = self.topology
        self.links = list(self._given_links) if self._given_links is not None else compute_links(topo, place(topo))
        profiles = load_profiles()
        lim = self.limits_enabled
        self.gpu = await CellGpu.make({lk.id: profiles[lk.profile].gpu_share_pct for lk in self.links}, lim,
                                      self.backend.gpu_problem)
        sp = profiles[topo.server.profile]
        self._specs = [NodeSpec(SERVER_ID, "server", SERVER_ADDRESS, -1, sp.cpu_cores if lim else None,
                                sp.memory_mb if lim else None)] + [
            NodeSpec(lk.id, "device", device_address(i), i, profiles[lk.profile].cpu_cores if lim else None,
                     profiles[lk.profile].memory_mb if lim else None, None, (), DEVICE_PIDS_MAX if lim else None)
            for i, lk in enumerate(self.links)]
        t0 = time.perf_counter()
        await self.backend.create(self._specs)
        self.timings_s["nodes_s"] = time.perf_counter() - t0
        self.timings_s.update({f"swarm_{k}": v for k, v in self.swarm.timings_s.items()})
        server = self.nodes[SERVER_ID] = NodeState(
            SERVER_ID, "server", self.backend.netns(SERVER_ID), SERVER_ADDRESS, None, None, self._specs[0].cpu_cores,
            self._specs[0].memory_mb, sp.name, topo.server_position.x_m, topo.server_position.y_m,
            host=self.swarm.host(SERVER_ID))
        for spec, lk in zip(self._specs[1:], self.links):
            self.nodes[lk.id] = NodeState(lk.id, "device", None, self.swarm.address(lk.id), lk.rate_up_mbps,
                                          lk.rate_down_mbps, spec.cpu_cores, spec.memory_mb, lk.profile, lk.x_m, lk.y_m,
                                          host=self.swarm.host(lk.id))
        await asyncio.to_thread(in_netns, server.netns, _reno)  # the downlinks' sender (devices: their sysctl)
        self.uplinks = UplinkImpairer(self.run_id, server.netns or "",
                                      (self.state_dir / "logs" / "delayer.log") if self.state_dir else None)
        self._current = {dev: imp for dev, imp in link_impairments(topo, self.links).items()}  # the keepers' at launch
        await self._apply_uplinks(list(self._current))
        t0 = time.perf_counter()
        self.control_broker = await start_broker(
            server.netns, self.swarm.server.control_address, Path(self.state_dir or ".") / "control-broker",
            self.control_settings, spawn=lambda argv, log, run_as: self.backend.spawn(SERVER_ID, argv, None, log,
                                                                  run_as=run_as))
        self.timings_s["control_broker_s"] = time.perf_counter() - t0
        self._health = asyncio.create_task(self._watch_nodes(), name=f"tb-{self.run_id}-nodes")
        if self.mobility_enabled and topo.mobility is not None:
            self._mobility_task = asyncio.create_task(self._mobility_loop(), name=f"tb-{self.run_id}-mobility")

    @property
    def control_address(self) -> str:
        return self.swarm.server.control_address

    def bind_control(self, control: DeviceControl) -> None:
        self.control = control

    def on_lost(self, callback: Callable[[list[str]], None]) -> None:
        """Call `callback(devices)` when a cluster node is seen down, with its devices: their
        processes died with it, and nothing of theirs can say so."""
        self._lost_callbacks.append(callback)

    async def close(self) -> None:
        for task in [self._health, *self._tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._health = None
        if self.control_broker is not None:
            handle, self.control_broker = self.control_broker, None
            with contextlib.suppress(Exception):
                await handle.stop()
        if self.uplinks is not None:
            await self.uplinks.close()
        await super().close()

    # the keepers -------------------------------------------------------------------
    async def ask(self, device: str, op: str, **args: Any) -> dict[str, Any]:
        """`op` to the device's keeper, once it is connected (bounded); its result."""
        if self.control is None:
            raise ResourceError(f"{op} {device}: the cell's control plane is not connected yet")
        await self._keeper_connected(device, op)
        return await self.control.call(device, op, **args)

    async def _keeper_connected(self, device: str, op: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._keeper_ready.get(device):
            if device in self._lost or time.monotonic() > deadline:
                why = "its node is down" if device in self._lost else f"not connected within {timeout_s:g} s"
                raise ResourceError(f"{op} {device}: its keeper cannot be reached ({why})")
            await asyncio.sleep(0.1)

    async def wait_synced(self, timeout_s: float) -> None:
        """Until every device's keeper is connected and its clock measured (the cell is up)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = [d for d in self.device_ids() if self.nodes[d].clock_offset_s is None]
            if not left:
                return
            if time.monotonic() > deadline:
                raise ResourceError(f"the keepers of {', '.join(left)} did not connect within {timeout_s:g} s "
                                    f"(their output: `docker service logs tb-{self.run_id}-<device>` on the manager)"
                                    + (f"; {'; '.join(self.warnings)}" if self.warnings else ""))
            await asyncio.sleep(0.2)

    def keeper_seen(self, device: str, doc: dict[str, Any]) -> None:
        """A keeper's state message (the control client calls this on the cell's loop):
        "ready" (with its address, rates, impairment, cut) or "offline" (its will)."""
        if device not in self.nodes or self.nodes[device].role != "device":
            return
        ready = doc.get("state") == "ready"
        was = self._keeper_ready.get(device)
        self._keeper_ready[device] = ready
        if ready and was is not True:  # (re)connected: a new task after its node came back, or the first time
            task = asyncio.get_running_loop().create_task(self._resync_retrying(device, doc))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _resync_retrying(self, device: str, doc: dict[str, Any], tries: int = 3) -> None:
        for n in range(tries):
            try:
                await self.resync(device, doc)
                return
            except ResourceError as e:
                if n == tries - 1:
                    self.warnings.append(f"{device}: its keeper could not be brought to the cell's state: {e}")
                    return
                await asyncio.sleep(1.0)

    async def resync(self, device: str, doc: dict[str, Any]) -> None:
        """A (re)connected keeper: its address, the cell's rates, impairment and cut state
        now, and its clock (measured, handed to its agent)."""
        lock = self._sync_locks.setdefault(device, asyncio.Lock())
        async with lock:
            node = self.nodes[device]
            if doc.get("address") and doc["address"] != node.address:
                node.address = doc["address"]
                await self._apply_uplinks([device])
            link = doc.get("link") or {}
            if (link.get("up_mbps"), link.get("down_mbps")) != (node.rate_up_mbps, node.rate_down_mbps):
                await self.ask(device, "rates", up_mbps=node.rate_up_mbps, down_mbps=node.rate_down_mbps)
            down = self._current.get(device, LinkImpairment()).down
            if link.get("down") != _imp_json(down):
                await self.ask(device, "impair", **_imp_json(down))
            if bool(link.get("cut")) != (device in self._cut):
                await self.ask(device, "cut" if device in self._cut else "restore")
            sample = await self.measure_clock(device)
            node.clock_offset_s, node.clock_rtt_s = round(sample.offset_s, 6), round(sample.rtt_s, 6)
            await self.ask(device, "offset", clock_offset_s=sample.offset_s)
        self._changed()

    async def measure_clock(self, device: str, samples: int = CLOCK_SAMPLES) -> ClockSample:
        """NTP-style: ask the keeper for its clock `samples` times; the shortest round trip."""
        assert self.control is not None
        await self._keeper_connected(device, "clock")
        out: list[ClockSample] = []
        for _ in range(samples):
            with contextlib.suppress(ResourceError):  # a probe lost on its way: the others decide
                out.append(ClockSample(*await self.control.sample_clock(device)))
            await asyncio.sleep(_CLOCK_GAP_S)
        return best_offset(out)

    async def _watch_nodes(self) -> None:
        """Every 0.5 s: the cluster's nodes; a device whose node or keeper is gone is `down`."""
        while True:
            try:
                self.node_states = await asyncio.to_thread(self.swarm.node_states)
            except Exception:  # noqa: BLE001 - the manager may be busy: next tick
                pass
            changed, buried = False, []
            for dev in self.device_ids():
                node = self.nodes[dev]
                host_down = self.node_states.get(node.host or "", "ready") != "ready"
                gone = host_down or self._keeper_ready.get(dev) is False
                if host_down and dev not in self._buried:
                    self._buried.add(dev)
                    buried.append(dev)
                elif not host_down:
                    self._buried.discard(dev)
                if gone and dev not in self._lost:
                    self._lost.add(dev)
                    changed = True
                elif not gone and dev in self._lost and self._keeper_ready.get(dev):
                    self._lost.discard(dev)
                    changed = True
                want = "killed" if node.state == "killed" else "down" if (dev in self._lost or dev in self._cut) else "up"
                if want != node.state:
                    node.state = want  # type: ignore[assignment]
                    changed = True
            if changed:
                self._changed()
            if buried:
                for cb in self._lost_callbacks:
                    cb(buried)
            await asyncio.sleep(_HEALTH_S)

    def _changed(self) -> None:
        """Tell the cell's followers (the supervisor rewrites state.json) now and once more
        a little later (a follower may skip a call that comes right after another)."""
        update = LinkUpdate(time.monotonic(), tuple({"id": n.id, "state": n.state, "host": n.host}
                                                    for n in self.nodes.values() if n.role == "device"))
        for cb in self._callbacks:
            cb(update)
        loop = asyncio.get_running_loop()
        loop.call_later(1.2, lambda: [cb(update) for cb in self._callbacks])

    # links ---------------------------------------------------------------------------
    async def set_links(self, rates: dict[str, tuple[float, float]]) -> None:
        for dev, (up, down) in rates.items():
            self._device(dev)
            if not (up > 0 and down > 0):
                raise ResourceError(f"set_link {dev}: rates must be > 0 Mbit/s (got up {up}, down {down})")
        await asyncio.gather(*(self.ask(dev, "rates", up_mbps=up, down_mbps=down) for dev, (up, down) in rates.items()))
        for dev, (up, down) in rates.items():
            self.nodes[dev].rate_up_mbps, self.nodes[dev].rate_down_mbps = up, down

    @property
    def impairments(self) -> dict[str, LinkImpairment]:
        return {dev: self._current.get(dev, LinkImpairment()) for dev in self.device_ids()}

    async def set_impairments(self, impairments: dict[str, LinkImpairment]) -> None:
        for dev in impairments:
            self._device(dev)
        new = {dev: LinkImpairment(imp.up.rounded(), imp.down.rounded()) for dev, imp in impairments.items()}
        await asyncio.gather(*(self.ask(dev, "impair", **_imp_json(imp.down)) for dev, imp in new.items()
                               if self.impairments[dev].down != imp.down))
        ups = [dev for dev, imp in new.items() if self.impairments[dev].up != imp.up]
        self._current.update(new)
        await self._apply_uplinks(ups)

    async def _apply_uplinks(self, devices: list[str]) -> None:
        assert self.uplinks is not None
        index = {lk.id: i for i, lk in enumerate(self.links)}
        changes = {dev: (self.nodes[dev].address or "", self._current.get(dev, LinkImpairment()).up,
                         1 + index[dev]) for dev in devices if self.nodes[dev].address}
        await self.uplinks.apply(changes)

    async def cut_link(self, device_id: str) -> None:
        node = self._device(device_id)
        await self.ask(device_id, "cut")
        self._cut.add(device_id)
        if node.state == "up":
            node.state = "down"

    async def restore_link(self, device_id: str) -> None:
        node = self._device(device_id)
        await self.ask(device_id, "restore")
        self._cut.discard(device_id)
        if node.state == "down" and device_id not in self._lost:
            node.state = "up"

    async def read_back(self) -> list:
        raise ResourceError("a Swarm cell's shaping lives in its devices; `verify_shaping()` asks their keepers")

    async def verify_shaping(self) -> list[str]:
        """Differences between each device's rates as its keeper has them and the cell's."""
        out = []
        for dev in self.device_ids():
            link = (await self.ask(dev, "status")).get("link") or {}
            node = self.nodes[dev]
            if (link.get("up_mbps"), link.get("down_mbps")) != (node.rate_up_mbps, node.rate_down_mbps):
                out.append(f"{dev}: keeper has up {link.get('up_mbps')} down {link.get('down_mbps')}, the cell "
                           f"{node.rate_up_mbps} / {node.rate_down_mbps} Mbit/s")
        return out

    # processes -------------------------------------------------------------------------
    async def kill(self, node_id: str) -> None:
        node = self._node(node_id)
        if node.role == "device":
            await self.ask(node_id, "kill")
        else:
            await self._stop_processes(node_id)
        node.state = "killed"

    async def revive(self, node_id: str) -> None:
        node = self._node(node_id)
        if node.role == "device":
            await self.ask(node_id, "restore")
            self._cut.discard(node_id)
        node.state = "down" if node_id in self._lost else "up"

    # reporting -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        doc = super().status()
        rules = self.uplinks.rules if self.uplinks is not None else {}
        doc["impairments"] = {
            "path": "nfqueue+iptables" if any(not i.is_zero for i in self._current.values()) else "none",
            "where": "downlink: each device's INPUT (its keeper); uplink: the server's INPUT",
            "uplink_chain": CHAIN if rules else None,
            "tcp_congestion_control": CONGESTION_CONTROL,
            "devices": {dev: imp.to_json() for dev, imp in self._current.items() if not imp.is_zero}}
        doc["cluster"] = {"name": self.cluster, "manager": self.swarm.plan.manager.name,
                          "nodes": dict(self.node_states) or {n: "ready" for n in self.swarm.node_names()},
                          "control_broker": None if self.control_broker is None else
                          {"host": self.control_broker.host, "port": self.control_broker.port}}
        doc["clocks"] = {"reference": "the run owner's clock (on the manager's host)",
                         "method": f"NTP-style over the control plane, shortest of {CLOCK_SAMPLES} round trips",
                         "devices": {n.id: {"offset_s": n.clock_offset_s, "rtt_s": n.clock_rtt_s}
                                     for n in self.nodes.values() if n.clock_offset_s is not None}}
        doc["warnings"] = list(self.warnings) + _swarm_notes(self.topology)
        return doc


def _imp_json(one: Impairment) -> dict[str, float]:
    return {"delay_ms": one.delay_ms, "jitter_ms": one.jitter_ms, "loss_pct": one.loss_pct}


def _reno() -> None:
    Path("/proc/sys/net/ipv4/tcp_congestion_control").write_text(CONGESTION_CONTROL)


def _swarm_notes(topo: Topology) -> list[str]:
    notes = []
    if topo.cell.shared_capacity:
        notes.append("cell.shared_capacity is not enforced in a Swarm cell: each device shapes only its own link")
    return notes

