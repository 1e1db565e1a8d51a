"""Traffic shaping of the cell: plan (pure, typed ops) -> apply (pyroute2) -> read back.

Layout (server side, one place for every device, so a shared cell is possible):

    device ns eth0 ──veth── port ─┐
                                  ├─ bridge (server ns, 198.18.0.1)
    downlink: HTB on the bridge's egress      1: ─ 1:1 (cell down) ─ 1:<dev> per device
              u32 `ip dst <device>` -> 1:<dev>
    uplink:   ingress on the bridge, u32 match-all -> mirred redirect to an IFB,
              HTB on the IFB's egress         1: ─ 1:1 (cell up) ─ 1:<dev>
              u32 `ip src <device>` -> 1:<dev>

Each device class has ceil = its radio rate. The parent class per direction has the cell
capacity when `cell.shared_capacity` is on (the sum of simultaneous transfers is capped;
each device is then assured its proportional share as `rate` and borrows up to its ceil),
else the sum of the device rates (never the bottleneck; rate = ceil). Unclassified traffic
(ARP, the host link) passes unshaped (HTB default 0). Every function takes a namespace
(name or /proc/<pid>/ns/net path) and interface names, so any backend can use it.
"""

from __future__ import annotations

import ipaddress
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from testbed.emulation.nsutil import open_iproute
from testbed.errors import ShapingError

__all__ = [
    "TC_H_ROOT",
    "TC_H_INGRESS",
    "HTB_HANDLE",
    "INGRESS_HANDLE",
    "Qdisc",
    "HtbClass",
    "U32Filter",
    "Op",
    "LinkRate",
    "ShapingPlan",
    "mbps_to_bps",
    "plan_cell",
    "plan_rates",
    "apply_plan",
    "change_rates",
    "read_back",
    "diff_plan",
    "shape",
    "handle_str",
]

TC_H_ROOT = 0xFFFFFFFF
TC_H_INGRESS = 0xFFFFFFF1
HTB_HANDLE = 0x10000
INGRESS_HANDLE = 0xFFFF0000
CELL_CLASS = HTB_HANDLE | 1
FIRST_DEVICE_MINOR = 0x100
_ETH_P_IP = 0x0800
_ETH_P_ALL = 0x0003
_OFF_SRC = 12
_OFF_DST = 16
_MTU_BYTES = 1600
QUEUE_S = 0.1  # each device's queue holds 100 ms at its rate (a cell buffers, but not seconds)
MIN_QUEUE_PACKETS = 16


def queue_packets(rate_bps: int) -> int:
    """Leaf queue depth: QUEUE_S of traffic at the class rate in 1514-byte frames."""
    return max(MIN_QUEUE_PACKETS, math.ceil(rate_bps / 8 * QUEUE_S / 1514))


def leaf_handle(classid: int) -> int:
    """The leaf pfifo under device class 1:<minor> gets handle <minor>:0."""
    return (classid & 0xFFFF) << 16


def handle_str(h: int) -> str:
    """0x10100 -> '1:100' (tc's hexadecimal notation)."""
    return f"{h >> 16:x}:{h & 0xFFFF:x}"


def mbps_to_bps(mbps: float) -> int:
    """Bit rate in whole bytes per second (the kernel keeps bytes/s), at least 8 kbit/s."""
    return max(1000, round(mbps * 1e6 / 8)) * 8


@dataclass(frozen=True)
class Qdisc:
    ifname: str
    kind: Literal["htb", "ingress", "pfifo"]
    handle: int
    parent: int
    default_minor: int = 0
    limit_packets: int = 0  # pfifo only

    def describe(self) -> str:
        extra = f" limit {self.limit_packets}p" if self.kind == "pfifo" else ""
        return f"qdisc {self.kind} {handle_str(self.handle)} parent {handle_str(self.parent)} on {self.ifname}{extra}"


@dataclass(frozen=True)
class HtbClass:
    ifname: str
    classid: int
    parent: int
    rate_bps: int
    ceil_bps: int

    def describe(self) -> str:
        return (f"class htb {handle_str(self.classid)} parent {handle_str(self.parent)} on {self.ifname} "
                f"rate {self.rate_bps / 1e6:g} Mbit ceil {self.ceil_bps / 1e6:g} Mbit")


@dataclass(frozen=True)
class U32Filter:
    """u32 on `parent`: match `ip <src|dst> address/32` (or everything when match is None)
    and classify into `classid`, or redirect to `redirect_ifname`'s egress."""

    ifname: str
    parent: int
    prio: int
    match: Literal["src", "dst"] | None
    address: str | None
    classid: int | None = None
    redirect_ifname: str | None = None

    def describe(self) -> str:
        m = f"ip {self.match} {self.address}" if self.match else "all"
        to = f"flowid {handle_str(self.classid)}" if self.classid is not None else f"redirect {self.redirect_ifname}"
        return f"filter u32 {m} {to} on {self.ifname} parent {handle_str(self.parent)}"


Op = Qdisc | HtbClass | U32Filter


@dataclass(frozen=True)
class LinkRate:
    device_id: str
    address: str
    up_mbps: float
    down_mbps: float


@dataclass(frozen=True)
class ShapingPlan:
    down_ifname: str
    up_ifname: str
    ops: tuple[Op, ...]
    classes: dict[str, int] = field(default_factory=dict)  # device id -> class id (both directions)


def _parent_rate_bps(rates_bps: Iterable[int], capacity_mbps: float | None) -> int:
    return mbps_to_bps(capacity_mbps) if capacity_mbps is not None else max(8000, sum(rates_bps))


def plan_rates(
    down_ifname: str,
    up_ifname: str,
    links: Sequence[LinkRate],
    classes: dict[str, int],
    capacity_up_mbps: float | None,
    capacity_down_mbps: float | None,
) -> list[HtbClass | Qdisc]:
    """The HTB classes (cell parent + one per device, each with its leaf pfifo) for both
    directions.

    HTB serves a class up to its own `rate` without asking the parent, so a cap on the
    sum only holds when the children's rates add up to at most the parent's: with a
    shared cell each device is assured its proportional share of the capacity (`rate`)
    and may borrow from the cell up to its radio rate (`ceil`)."""
    ops: list[HtbClass | Qdisc] = []
    for ifname, attr, cap in ((down_ifname, "down_mbps", capacity_down_mbps), (up_ifname, "up_mbps", capacity_up_mbps)):
        rates = {link.device_id: mbps_to_bps(getattr(link, attr)) for link in links}
        parent = _parent_rate_bps(rates.values(), cap)
        total = sum(rates.values())
        ops.append(HtbClass(ifname, CELL_CLASS, HTB_HANDLE, parent, parent))
        for link in links:
            r = rates[link.device_id]
            cid = classes[link.device_id]
            assured = r if total <= parent else max(8000, (parent * r // total) // 8 * 8)
            ops.append(HtbClass(ifname, cid, CELL_CLASS, assured, r))
            ops.append(Qdisc(ifname, "pfifo", leaf_handle(cid), cid, limit_packets=queue_packets(r)))
    return ops


def plan_cell(
    down_ifname: str,
    up_ifname: str,
    links: Sequence[LinkRate],
    capacity_up_mbps: float | None = None,
    capacity_down_mbps: float | None = None,
) -> ShapingPlan:
    """Every op that shapes the cell (see the module docstring); pure."""
    ids = [link.device_id for link in links]
    if len(set(ids)) != len(ids):
        raise ShapingError(f"duplicate device ids in the shaping plan: {sorted({i for i in ids if ids.count(i) > 1})}")
    if len(links) > 0xFFFF - FIRST_DEVICE_MINOR:
        raise ShapingError(f"{len(links)} devices: at most {0xFFFF - FIRST_DEVICE_MINOR} fit the HTB class ids")
    for link in links:
        ipaddress.IPv4Address(link.address)
        if link.up_mbps <= 0 or link.down_mbps <= 0:
            raise ShapingError(f"device {link.device_id}: rates must be > 0 Mbit/s (up {link.up_mbps}, down {link.down_mbps})")
    classes = {link.device_id: HTB_HANDLE | (FIRST_DEVICE_MINOR + i) for i, link in enumerate(links)}
    ops: list[Op] = [
        Qdisc(down_ifname, "htb", HTB_HANDLE, TC_H_ROOT),
        Qdisc(up_ifname, "htb", HTB_HANDLE, TC_H_ROOT),
        Qdisc(down_ifname, "ingress", INGRESS_HANDLE, TC_H_INGRESS),
    ]
    ops += plan_rates(down_ifname, up_ifname, links, classes, capacity_up_mbps, capacity_down_mbps)
    ops.append(U32Filter(down_ifname, INGRESS_HANDLE, 1, None, None, redirect_ifname=up_ifname))
    for link in links:
        ops.append(U32Filter(down_ifname, HTB_HANDLE, 1, "dst", link.address, classid=classes[link.device_id]))
        ops.append(U32Filter(up_ifname, HTB_HANDLE, 1, "src", link.address, classid=classes[link.device_id]))
    return ShapingPlan(down_ifname, up_ifname, tuple(ops), classes)


# ---------------------------------------------------------------------------------------
# Apply


def _htb_class_args(op: HtbClass) -> dict:
    rate_bytes = op.rate_bps // 8
    ceil_bytes = op.ceil_bps // 8
    return dict(
        parent=op.parent,
        rate=f"{op.rate_bps}bit",
        ceil=f"{op.ceil_bps}bit",
        burst=rate_bytes // 1000 + _MTU_BYTES,
        cburst=ceil_bytes // 1000 + _MTU_BYTES,
        quantum=max(1514, min(rate_bytes // 10, 60000)),
    )


def _u32_key(op: U32Filter) -> str:
    if op.match is None:
        return "0x0/0x0+0"
    addr = int(ipaddress.IPv4Address(op.address))
    return f"0x{addr:08x}/0xffffffff+{_OFF_SRC if op.match == 'src' else _OFF_DST}"


async def _index(ipr: AsyncIPRoute, ifname: str, cache: dict[str, int]) -> int:
    if ifname not in cache:
        found = await ipr.link_lookup(ifname=ifname)
        if not found:
            raise ShapingError(f"interface {ifname!r} not found in the shaping namespace")
        cache[ifname] = found[0]
    return cache[ifname]


async def _apply_op(ipr: AsyncIPRoute, op: Op, idx: dict[str, int], class_cmd: str = "add-class") -> None:
    index = await _index(ipr, op.ifname, idx)
    if isinstance(op, Qdisc):
        if op.kind == "pfifo":
            cmd = "add" if class_cmd == "add-class" else "replace"
            await ipr.tc(cmd, "pfifo", index, op.handle, parent=op.parent, limit=op.limit_packets)
        elif op.kind == "htb":
            await ipr.tc("add", "htb", index, op.handle, parent=op.parent, default=op.default_minor)
        else:
            await ipr.tc("add", "ingress", index, op.handle)
    elif isinstance(op, HtbClass):
        await ipr.tc(class_cmd, "htb", index, op.classid, **_htb_class_args(op))
    else:
        kw: dict = dict(parent=op.parent, prio=op.prio, keys=[_u32_key(op)])
        if op.redirect_ifname is not None:
            target = await _index(ipr, op.redirect_ifname, idx)
            kw.update(protocol=_ETH_P_ALL, target=0x1,  # pyroute2 needs a target even for mirred
                      action=dict(kind="mirred", direction="egress", action="redirect", ifindex=target))
        else:
            kw.update(protocol=_ETH_P_IP, target=op.classid)
        await ipr.tc("add-filter", "u32", index, **kw)


async def apply_plan(ipr: AsyncIPRoute, ops: Iterable[Op]) -> None:
    """Apply every op in order; a failure names the op."""
    idx: dict[str, int] = {}
    for op in ops:
        try:
            await _apply_op(ipr, op, idx)
        except NetlinkError as e:
            raise ShapingError(f"{op.describe()}: {e.args[-1] if e.args else e} (errno {e.code})") from None


async def change_rates(ipr: AsyncIPRoute, classes: Iterable[HtbClass | Qdisc]) -> None:
    """Change existing HTB classes in place (`tc class change`) and replace their leaf
    queues: TCP connections survive."""
    idx: dict[str, int] = {}
    for op in classes:
        try:
            await _apply_op(ipr, op, idx, class_cmd="change-class")
        except NetlinkError as e:
            raise ShapingError(f"change {op.describe()}: {e.args[-1] if e.args else e} (errno {e.code})") from None


async def shape(netns: str | None, ops: Sequence[Op]) -> None:
    """The one entry point of every backend: apply `ops` inside `netns`."""
    async with open_iproute(netns) as ipr:
        await apply_plan(ipr, ops)


# ---------------------------------------------------------------------------------------
# Read back


async def read_back(ipr: AsyncIPRoute, ifnames: Sequence[str]) -> list[Op]:
    """The qdiscs, HTB classes and u32 filters on `ifnames`, as plan ops."""
    idx: dict[str, int] = {}
    names: dict[int, str] = {}
    for name in ifnames:
        names[await _index(ipr, name, idx)] = name
    async for link in await ipr.link("dump"):
        names.setdefault(link["index"], link.get("ifname"))
    ops: list[Op] = []
    for name in ifnames:
        index = idx[name]
        async for q in await ipr.get_qdiscs(index):
            kind = q.get("TCA_KIND")
            if kind == "htb":
                opts = q.get("TCA_OPTIONS")
                defcls = opts.get("TCA_HTB_INIT")["defcls"] if opts is not None else 0
                ops.append(Qdisc(name, "htb", q["handle"], q["parent"], defcls))
            elif kind == "ingress":
                ops.append(Qdisc(name, "ingress", q["handle"], q["parent"]))
            elif kind == "pfifo":
                ops.append(Qdisc(name, "pfifo", q["handle"], q["parent"], limit_packets=q.get("TCA_OPTIONS")["limit"]))
        async for c in await ipr.get_classes(index):
            if c.get("TCA_KIND") != "htb":
                continue
            parms = c.get("TCA_OPTIONS").get("TCA_HTB_PARMS")
            opts = c.get("TCA_OPTIONS")
            rate = opts.get("TCA_HTB_RATE64") or parms["rate"]
            ceil = opts.get("TCA_HTB_CEIL64") or parms["ceil"]
            # the kernel reports a class attached to the qdisc itself with parent "root"
            parent = HTB_HANDLE if c["parent"] == TC_H_ROOT else c["parent"]
            ops.append(HtbClass(name, c["handle"], parent, rate * 8, ceil * 8))
        for parent in (HTB_HANDLE, INGRESS_HANDLE):
            async for f in await ipr.get_filters(index, parent=parent):
                op = _filter_op(name, parent, f, names)
                if op is not None:
                    ops.append(op)
    return ops


def _filter_op(ifname: str, parent: int, f, names: dict[int, str]) -> U32Filter | None:
    if f.get("TCA_KIND") != "u32":
        return None
    opts = f.get("TCA_OPTIONS")
    sel = opts.get("TCA_U32_SEL") if opts is not None else None
    if sel is None:  # the hash-table node u32 creates for itself
        return None
    keys = sel["keys"]
    match: Literal["src", "dst"] | None = None
    address = None
    if keys:
        # pyroute2 0.9 labels struct tc_u32_key {mask, val, off, offmask} one field late
        # after its 4-byte pad: key_val holds the mask, key_off the value, key_offmask the
        # offset. Values are in network byte order.
        k = keys[0]
        mask, val, off = k["key_val"], k["key_off"], k["key_offmask"]
        if mask != 0:
            match = "src" if off == _OFF_SRC else "dst" if off == _OFF_DST else None
            address = str(ipaddress.IPv4Address(struct.pack("<I", val & 0xFFFFFFFF)))
    classid = opts.get("TCA_U32_CLASSID")
    redirect = None
    act = opts.get("TCA_U32_ACT")
    if act is not None:
        for a in act.get_attrs("TCA_ACT_PRIO_1"):
            o = a.get("TCA_ACT_OPTIONS")
            parms = o.get("TCA_MIRRED_PARMS") if o is not None else None
            if parms is not None:
                redirect = names.get(parms["ifindex"], str(parms["ifindex"]))
    prio = f["info"] >> 16
    return U32Filter(ifname, parent, prio, match, address,
                     classid=classid if redirect is None else None, redirect_ifname=redirect)


def diff_plan(planned: Sequence[Op], observed: Sequence[Op]) -> list[str]:
    """Human-readable differences; empty when the kernel holds exactly the plan."""
    p, o = set(planned), set(observed)
    return [f"missing: {x.describe()}" for x in planned if x not in o] + [
        f"unexpected: {x.describe()}" for x in observed if x not in p
    ]
