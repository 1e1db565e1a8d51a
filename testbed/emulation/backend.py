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
from typing import Literal, Protocol

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from testbed.emulation.nsutil import create_netns, list_netns, netns_path, open_iproute, remove_netns
from testbed.errors import ResourceError
from testbed.model.names import CELL_NET, HOST_ADDRESS, RUN_ID_RE, SERVER_ADDRESS, check_run_id

__all__ = [
    "NodeSpec",
    "Backend",
    "NetnsBackend",
    "SERVER_ADDRESS",
    "HOST_ADDRESS",
    "CELL_PREFIX",
    "device_address",
    "RUN_ID_RE",
    "check_run_id",
    "remove_host_links",
]

CELL_PREFIX = 16
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


class Backend(Protocol):
    """What the Emulation needs from a way of isolating nodes."""

    name: str
    host_route: bool

    async def create(self, nodes: Sequence[NodeSpec]) -> None: ...
    def netns(self, node_id: str) -> str: ...
    def shaping_target(self) -> tuple[str, str, str]:
        """(netns of the shaper, downlink interface, uplink IFB)."""
        ...
    async def set_link_state(self, node_id: str, up: bool) -> None: ...
    async def destroy(self) -> list[str]: ...


class NetnsBackend:
    name = "netns"

    def __init__(self, run_id: str, gso_off: bool = True):
        self.run = check_run_id(run_id)
        self.gso_off = gso_off
        self.host_route = False
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

    async def set_link_state(self, node_id: str, up: bool) -> None:
        node = self._nodes[node_id]
        async with open_iproute(self.netns("server")) as srv:
            await srv.link("set", index=await _idx(srv, self.port(node)), state="up" if up else "down")

    # destroy -----------------------------------------------------------------------
    async def destroy(self) -> list[str]:
        """Remove the host link and every namespace of the run; returns what it removed."""
        removed = await remove_host_links(self.run)
        for name in list_netns(f"tb-{self.run}-"):
            if remove_netns(name):
                removed.append(f"netns {name}")
        self._created.clear()
        return removed


async def remove_host_links(run_id: str | None = None) -> list[str]:
    """Delete root-namespace host links `tb<run>h` (all runs' when run_id is None)."""
    pat = re.compile(rf"^tb{re.escape(run_id)}h$" if run_id else r"^tb[a-z0-9]{1,7}h$")
    removed = []
    async with AsyncIPRoute() as root:
        async for link in await root.link("dump"):
            name = link.get("ifname")
            if name and pat.fullmatch(name):
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
