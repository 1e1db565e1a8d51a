"""The `Backend` protocol and the `netns` backend (a network namespace per node).

Layout of run R (interface names carry the run id; at most 15 characters):

    root ns      tbRh  198.18.255.254/32 (route 198.18.0.0/16 when free) ──veth──┐
    tb-R-server  bridge tbRbr 198.18.0.1/16, ifb tbRup, ports tbRhs ─────────────┘
                 tbRd<i> ──veth── eth0 198.18.0.<10+i>/16 in tb-R-<device>

Everything a run makes lives in its namespaces except the host link's root side, which
`destroy()` (and `testbed down --all`) remove by name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from testbed.emulation.cell import NodeJoin
from testbed.emulation.cgroups import CgroupLimits, Cgroups, detect_cgroups
from testbed.emulation.nsutil import create_netns, list_netns, netns_path, open_iproute, pids_in_netns, remove_netns
from testbed.emulation.procs import spawn_in
from testbed.errors import ResourceError
from testbed.model.names import CELL_NET, HOST_ADDRESS, SERVER_ADDRESS, check_run_id

__all__ = [
    "NodeSpec",
    "Backend",
    "NetnsBackend",
    "CELL_PREFIX",
    "DEVICE_PIDS_MAX",
    "device_address",
    "remove_host_links",
    "remove_root_links",
]

CELL_PREFIX = 16
#: Processes and threads a device node may hold at once (cgroup pids.max, docker
#: pids_limit): an agent needs a few dozen (torch's pools, asyncio's executor, MQTT); a
#: fork bomb stops here instead of at the host's limit.
DEVICE_PIDS_MAX = 512
FIRST_DEVICE = int(ipaddress.IPv4Address("198.18.0.10"))


def device_address(index: int) -> str:
    """Address of the index-th device (0-based): 198.18.0.10 upward."""
    addr = ipaddress.IPv4Address(FIRST_DEVICE + index)
    if addr >= ipaddress.IPv4Address(HOST_ADDRESS):
        raise ResourceError(f"device #{index}: no address left in {CELL_NET}")
    return str(addr)


@dataclass(frozen=True)
class NodeSpec:
    id: str
    role: Literal["server", "device"]
    address: str
    index: int  # devices: 0-based position; server: -1
    cpu_cores: float | None = None  # limits; None: unlimited
    memory_mb: int | None = None
    gpu_share_pct: int | None = None
    gpu_env: tuple[tuple[str, str], ...] = ()  # the environment of its GPU share (emulation/gpu.py); () none
    pids_max: int | None = None  # processes + threads; None: no limit


class Backend(Protocol):
    """A way of making and entering nodes (namespaces or containers). `Emulation` takes
    one as a parameter and never asks which one it holds: each implements all of this."""

    name: str
    host_route: bool
    host_ifname: str  # the host-side interface its devices reach the host through (host_firewall.py)

    async def create(self, nodes: Sequence[NodeSpec]) -> None:
        """Make every node with its limits, the links between them and the host link."""
        ...
    async def destroy(self) -> list[str]: ...
    def netns(self, node_id: str) -> str: ...
    def shaping_target(self) -> tuple[str, str, str]:
        """(netns of the shaper, downlink interface, uplink IFB)."""
        ...
    async def set_link_state(self, node_id: str, up: bool) -> None: ...
    async def set_cpu(self, node_id: str, cpu_cores: float) -> None: ...
    def join(self, node_id: str) -> NodeJoin: ...
    async def spawn(self, node_id: str, argv: Sequence[str], env: dict[str, str] | None = None,
                    log_path: Path | None = None) -> Any:
        """Start argv inside the node; returns a Popen-like handle (pid, poll(), returncode)."""
        ...
    def pids(self, node_id: str) -> set[int]:
        """Processes the testbed started in the node (not a container's own idle ones)."""
        ...
    def gpu_problem(self) -> str | None:
        """Why this backend cannot give its nodes the host's GPU (None: it can); asked
        only on a host with a GPU."""
        ...
    @property
    def pids_limit(self) -> str | None:
        """What enforces NodeSpec.pids_max ("cgroup v1 pids", "docker pids_limit", ...);
        None: nothing on this host (after create)."""
        ...


class NetnsBackend:
    """Nodes are network namespaces; limits are cgroups `testbed/<run>/<node>`."""

    name = "netns"

    def __init__(self, run_id: str, gso_off: bool = True, cgroups: Cgroups | None = None, limits: bool = True):
        self.run = check_run_id(run_id)
        self.gso_off = gso_off
        self.host_route = False
        self.limits = limits
        self.cg: Cgroups | None = cgroups
        self._nodes: dict[str, NodeSpec] = {}
        self._created: list[str] = []

    # names -------------------------------------------------------------------------
    def ns_name(self, node_id: str) -> str:
        return f"tb-{self.run}-{node_id}"

    def netns(self, node_id: str) -> str:
        return netns_path(self.ns_name(node_id))

    @property
    def bridge(self) -> str:
        return f"tb{self.run}br"

    @property
    def ifb(self) -> str:
        return f"tb{self.run}up"

    @property
    def host_if(self) -> str:
        return f"tb{self.run}h"

    @property
    def host_ifname(self) -> str:
        return self.host_if

    @property
    def pids_limit(self) -> str | None:
        return self.cg.pids_controller if self.cg is not None else None

    def port(self, node: NodeSpec) -> str:
        return f"tb{self.run}d{node.index}"

    def shaping_target(self) -> tuple[str, str, str]:
        return self.netns("server"), self.bridge, self.ifb

    # create ------------------------------------------------------------------------
    async def create(self, nodes: Sequence[NodeSpec]) -> None:
        server = next(n for n in nodes if n.role == "server")
        self._nodes = {n.id: n for n in nodes}
        gso = {"gso_max_segs": 1} if self.gso_off else {}
        sock = await create_netns(self.ns_name(server.id))
        self._created.append(self.ns_name(server.id))
        async with open_iproute(sock=sock) as srv:
            await _up(srv, "lo")
            await srv.link("add", ifname=self.bridge, kind="bridge", txqlen=1000, **gso)
            br = await _idx(srv, self.bridge)
            await srv.addr("add", index=br, address=server.address, prefixlen=CELL_PREFIX)
            await srv.link("add", ifname=self.ifb, kind="ifb", txqlen=1000)
            await _up(srv, self.ifb)
            await self._host_link(srv, br)
            await srv.link("set", index=br, state="up")
            sem = asyncio.Semaphore(16)
            await asyncio.gather(*(self._device(srv, br, n, sem) for n in nodes if n.role == "device"))
        await self._create_cgroups(nodes)

    async def _host_link(self, srv: AsyncIPRoute, br: int) -> None:
        peer = f"tb{self.run}hs"
        fd = os.open(self.netns("server"), os.O_RDONLY)
        try:
            async with AsyncIPRoute() as root:
                await root.link("add", ifname=self.host_if, kind="veth", peer={"ifname": peer, "net_ns_fd": fd})
                h = await _idx(root, self.host_if)
                await root.addr("add", index=h, address=HOST_ADDRESS, prefixlen=32)
                await root.link("set", index=h, state="up")
                try:
                    await root.route("add", dst=CELL_NET, oif=h, prefsrc=HOST_ADDRESS)
                    self.host_route = True
                except NetlinkError as e:
                    if e.code != 17:  # EEXIST: another run owns the host route
                        raise
        finally:
            os.close(fd)
        p = await _idx(srv, peer)
        await srv.link("set", index=p, master=br, state="up")

    async def _device(self, srv: AsyncIPRoute, br: int, node: NodeSpec, sem: asyncio.Semaphore) -> None:
        async with sem:
            name = self.ns_name(node.id)
            sock = await create_netns(name)
            self._created.append(name)
            fd = os.open(self.netns(node.id), os.O_RDONLY)
            gso = {"gso_max_segs": 1} if self.gso_off else {}
            try:
                await srv.link("add", ifname=self.port(node), kind="veth",
                               peer={"ifname": "eth0", "net_ns_fd": fd, **gso})
            finally:
                os.close(fd)
            p = await _idx(srv, self.port(node))
            await srv.link("set", index=p, master=br, state="up")
            async with open_iproute(sock=sock) as dev:
                await _up(dev, "lo")
                e = await _idx(dev, "eth0")
                await dev.addr("add", index=e, address=node.address, prefixlen=CELL_PREFIX)
                await dev.link("set", index=e, state="up")
                await dev.route("add", dst="0.0.0.0/0", gateway=SERVER_ADDRESS)

    async def _create_cgroups(self, nodes: Sequence[NodeSpec]) -> None:
        if not self.limits:
            return
        self.cg = self.cg or detect_cgroups()
        for n in nodes:
            await asyncio.to_thread(self.cg.create, self.run, n.id, CgroupLimits(n.cpu_cores, n.memory_mb, n.pids_max))

    async def set_link_state(self, node_id: str, up: bool) -> None:
        node = self._nodes[node_id]
        async with open_iproute(self.netns("server")) as srv:
            await srv.link("set", index=await _idx(srv, self.port(node)), state="up" if up else "down")

    # processes ---------------------------------------------------------------------
    async def set_cpu(self, node_id: str, cpu_cores: float) -> None:
        if self.cg is None:
            raise ResourceError(f"set_cpu {node_id}: this emulation runs without cgroups (limits off)")
        node = self._nodes[node_id]
        await asyncio.to_thread(self.cg.set_limits, self.run, node_id, CgroupLimits(cpu_cores, node.memory_mb,
                                                                                      node.pids_max))

    def join(self, node_id: str) -> NodeJoin:
        procs = tuple(str(p) for p in self.cg.procs_files(self.run, node_id)) if self.cg is not None else ()
        return NodeJoin(self.netns(node_id), procs)

    async def spawn(self, node_id: str, argv: Sequence[str], env: dict[str, str] | None = None,
                    log_path: Path | None = None) -> Any:
        j = self.join(node_id)
        return await asyncio.to_thread(spawn_in, j.netns, list(argv), env, log_path, [Path(p) for p in j.cgroup_procs])

    def pids(self, node_id: str) -> set[int]:
        """Every process in the node's cgroups or its network namespace."""
        found = set(self.cg.pids(self.run, node_id)) if self.cg is not None else set()
        return found | pids_in_netns([Path(self.netns(node_id))])

    def gpu_problem(self) -> str | None:
        """None: a node's processes run in the host's mount namespace and see its GPU."""
        return None

    # destroy -----------------------------------------------------------------------
    async def destroy(self) -> list[str]:
        """Remove the host link, every namespace and every cgroup of the run; returns what it removed."""
        removed = await remove_host_links(self.run)
        if self.cg is not None and self.run in self.cg.runs():
            await asyncio.to_thread(self.cg.remove, self.run)
            removed.append(f"cgroup testbed/{self.run}")
        for name in list_netns(f"tb-{self.run}-"):
            if remove_netns(name):
                removed.append(f"netns {name}")
        self._created.clear()
        return removed


async def remove_host_links(run_id: str | None = None) -> list[str]:
    """Delete root-namespace host links `tb<run>h` (all runs' when run_id is None)."""
    return await remove_root_links(re.compile(rf"^tb{re.escape(run_id)}h$" if run_id else r"^tb[a-z0-9]{1,7}h$"))


async def remove_root_links(pattern: re.Pattern[str]) -> list[str]:
    """Delete the root namespace's links whose name matches `pattern`; a link that is gone
    meanwhile (with its peer's namespace) is no error."""
    removed = []
    async with AsyncIPRoute() as root:
        async for link in await root.link("dump"):
            name = link.get("ifname")
            if name and pattern.fullmatch(name):
                try:
                    await root.link("del", index=link["index"])
                    removed.append(f"link {name}")
                except NetlinkError as e:
                    if e.code != 19:  # ENODEV: gone with its namespace meanwhile
                        raise
    return removed


async def _idx(ipr: AsyncIPRoute, ifname: str) -> int:
    found = await ipr.link_lookup(ifname=ifname)
    if not found:
        raise ResourceError(f"interface {ifname!r} was not created")
    return found[0]


async def _up(ipr: AsyncIPRoute, ifname: str) -> None:
    await ipr.link("set", index=await _idx(ipr, ifname), state="up")
