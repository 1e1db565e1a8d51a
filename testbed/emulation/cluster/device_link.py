"""A Swarm device's own link, made and changed from inside the device's namespace (its
keeper, as root with NET_ADMIN): rates, the downlink's delay and loss, a cut link.

On one host the edge server's namespace shapes every device's link (shaping.py); a Swarm
device runs on a host the run owner does not reach, so it shapes itself, as the compose
deployment's devices do (docker/selfshape.py), with the same typed ops: uplink = HTB on
the egress of its cell interface, downlink = that interface's ingress redirected to an IFB
with HTB on the IFB's egress — each class with the same 100 ms pfifo leaf as on one host.
The downlink's delay and loss are applied where the packets are received, as on one
host (impair.py): this namespace's INPUT chain jumps to `TB-IMPAIR`, whose rules drop a
random share of the server's packets and queue the rest to the device's own NFQUEUE
delayer (delayer.py, which needs no setns in its own namespace). The uplink's are the
server's (its namespace, on the manager). A cut takes the cell interface down; the
keeper's control traffic runs on another interface (the cell's control network) and is
neither shaped, impaired nor cut.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import shutil
import subprocess
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

from testbed.emulation.impair import CHAIN, DEVICE_QUEUE, chain_rules
from testbed.emulation.nsutil import open_iproute
from testbed.emulation.shaping import (FIRST_DEVICE_MINOR, HTB_HANDLE, INGRESS_HANDLE, TC_H_INGRESS, TC_H_ROOT, HtbClass,
                                       Op, Qdisc, U32Filter, change_rates, leaf_handle, mbps_to_bps, queue_packets,
                                       shape)
from testbed.errors import ResourceError, ShapingError
from testbed.model.impairments import Impairment

__all__ = ["IFB", "DEVICE_CLASS", "plan_device", "rate_ops", "find_interface", "DeviceLinkOps"]

IFB = "ifb0"
#: the device's class (as the first device's on one host: 1:100, its leaf 100:0)
DEVICE_CLASS = HTB_HANDLE | FIRST_DEVICE_MINOR


def _one_way(ifname: str, mbps: float) -> list[Op]:
    bps = mbps_to_bps(mbps)
    return [HtbClass(ifname, DEVICE_CLASS, HTB_HANDLE, bps, bps),
            Qdisc(ifname, "pfifo", leaf_handle(DEVICE_CLASS), DEVICE_CLASS, limit_packets=queue_packets(bps))]


def rate_ops(ifname: str, ifb: str, up_mbps: float, down_mbps: float) -> list[Op]:
    """The classes and leaves that carry the rates (what a rate change replaces). Pure."""
    if not (up_mbps > 0 and down_mbps > 0):
        raise ShapingError(f"rates must be > 0 Mbit/s (up {up_mbps}, down {down_mbps})")
    return _one_way(ifname, up_mbps) + _one_way(ifb, down_mbps)


def plan_device(ifname: str, ifb: str, up_mbps: float, down_mbps: float) -> list[Op]:
    """Every op of one device's own link: all IP traffic out of `ifname` at up_mbps, all
    into it (through `ifb`) at down_mbps, each behind a 100 ms pfifo. Pure."""
    rates = rate_ops(ifname, ifb, up_mbps, down_mbps)
    return [Qdisc(ifname, "htb", HTB_HANDLE, TC_H_ROOT), *rates[:2],
            U32Filter(ifname, HTB_HANDLE, 1, None, None, classid=DEVICE_CLASS),
            Qdisc(ifb, "htb", HTB_HANDLE, TC_H_ROOT), *rates[2:],
            U32Filter(ifb, HTB_HANDLE, 1, None, None, classid=DEVICE_CLASS),
            Qdisc(ifname, "ingress", INGRESS_HANDLE, TC_H_INGRESS),
            U32Filter(ifname, INGRESS_HANDLE, 1, None, None, redirect_ifname=ifb)]


async def find_interface(subnet: str, timeout_s: float = 10.0) -> tuple[str, str]:
    """(interface, address) of this namespace's interface with an address in `subnet`
    (a container's interfaces are named by the order docker attached its networks)."""
    net = ipaddress.ip_network(subnet)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        async with open_iproute(None) as ipr:
            names = {link["index"]: link.get("ifname") async for link in await ipr.link("dump")}
            async for a in await ipr.addr("dump", family=2):
                addr = a.get("address")
                if addr and ipaddress.ip_address(addr) in net:
                    return names[a["index"]], addr
        if asyncio.get_running_loop().time() > deadline:
            raise ResourceError(f"no interface of this container has an address in {subnet}")
        await asyncio.sleep(0.1)


def _iptables_restore(text: str) -> None:
    tool = shutil.which("iptables-restore", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if tool is None:
        raise ResourceError("iptables-restore is not in this image; the downlink's delay and loss need it")
    r = subprocess.run([tool, "--noflush"], input=text.encode(), capture_output=True, timeout=30)
    if r.returncode != 0:
        raise ResourceError(f"iptables in this device: {r.stderr.decode(errors='replace').strip() or 'failed'}; "
                            "delay and loss need NET_ADMIN and NET_RAW, the statistic match and the NFQUEUE target")


@dataclass
class DeviceLinkOps:
    """This namespace's own link: `setup` once, then rates, impairment and cut live."""

    ifname: str
    server_address: str
    run_id: str = "swarm"
    ifb: str = IFB
    up_mbps: float = 0.0
    down_mbps: float = 0.0
    down: Impairment = Impairment()
    cut: bool = False
    _delayer: object | None = None
    _hooked: bool = False

    async def setup(self, up_mbps: float, down_mbps: float, gso_off: bool = True) -> None:
        """The IFB, GSO capped (as on one host), the shaping ops."""
        async with open_iproute(None) as ipr:
            if not await ipr.link_lookup(ifname=self.ifb):
                try:
                    await ipr.link("add", ifname=self.ifb, kind="ifb", txqlen=1000)
                except NetlinkError as e:
                    raise ShapingError(f"cannot make {self.ifb} ({e}); the device needs NET_ADMIN and the host the "
                                       "ifb module") from None
            await ipr.link("set", index=(await ipr.link_lookup(ifname=self.ifb))[0], state="up")
            if gso_off:
                await ipr.link("set", index=(await ipr.link_lookup(ifname=self.ifname))[0], gso_max_segs=1)
        await shape(None, plan_device(self.ifname, self.ifb, up_mbps, down_mbps))
        self.up_mbps, self.down_mbps = up_mbps, down_mbps

    async def set_rates(self, up_mbps: float, down_mbps: float) -> None:
        """Change the classes in place (`tc class change`): TCP connections survive."""
        async with open_iproute(None) as ipr:
            await change_rates(ipr, [op for op in rate_ops(self.ifname, self.ifb, up_mbps, down_mbps)
                                     if isinstance(op, HtbClass | Qdisc)])
        self.up_mbps, self.down_mbps = up_mbps, down_mbps

    async def impair(self, down: Impairment) -> None:
        """The downlink's delay, jitter and loss (packets from the server, received here)."""
        down = down.rounded()
        if down == self.down:
            return
        if down.delay_ms > 0 or down.jitter_ms > 0 or self._delayer is not None:
            await asyncio.to_thread(self._queue, down)
        await asyncio.to_thread(_iptables_restore, chain_rules([(self.server_address, down, DEVICE_QUEUE)],
                                                               hook=not self._hooked))
        self._hooked = True
        self.down = down

    def _queue(self, one: Impairment) -> None:
        from testbed.emulation.delayer import DelayerHandle

        op = "set" if self._delayer is not None else "add"
        if self._delayer is None:
            self._delayer = DelayerHandle(self.run_id)
        self._delayer.queue(op, "/proc/self/ns/net", DEVICE_QUEUE, one.delay_ms, one.jitter_ms)  # type: ignore[attr-defined]

    async def set_cut(self, cut: bool) -> None:
        """Take the cell interface down (the device out of coverage) or up again."""
        async with open_iproute(None) as ipr:
            await ipr.link("set", index=(await ipr.link_lookup(ifname=self.ifname))[0], state="down" if cut else "up")
        self.cut = cut

    def status(self) -> dict[str, object]:
        return {"interface": self.ifname, "up_mbps": self.up_mbps, "down_mbps": self.down_mbps,
                "down": dataclasses.asdict(self.down), "cut": self.cut, "impair_chain": CHAIN if self._hooked else None}

    def close(self) -> None:
        if self._delayer is not None:
            self._delayer.stop()  # type: ignore[attr-defined]
            self._delayer = None
