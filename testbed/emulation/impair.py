"""Link impairments of a cell (delay, jitter, loss per direction): plan (pure), apply, change
live, read back, remove — on every kernel.

Two paths, chosen once per cell (recorded as `path` in the status):

- `netem`, where the kernel has sch_netem: a netem qdisc replaces the pfifo leaf of each
  impaired device's HTB class (shaping.py), downlink on the server's bridge, uplink on its
  IFB, through pyroute2. With jitter, netem also gets the class's ceil as its rate: netem
  then times each packet after the previous one and keeps the flow in order.
- `nfqueue+iptables`, where it has not (this VM): each receiver's INPUT chain (the device's
  namespace for the downlink, the server's for the uplink: all cell traffic is device <->
  edge server) jumps to a chain `TB-IMPAIR` whose rules drop a random share of the link's
  packets (`-m statistic --mode random`) and queue the rest to a netfilter queue when the
  link has a delay; the cell's delayer process (delayer.py) holds them until due. Queue 0
  in a device's namespace; queue index+1 per device in the server's. Receiving side,
  because a packet held on the sender's OUTPUT chain still counts against its socket and
  TCP small queues would throttle the flow.

`none`: no link has an impairment (nothing is installed; a later change picks a path).
A requested impairment that cannot be applied raises ResourceError naming what is missing.

TCP congestion control: once a cell has impairments, every node's namespace uses Reno
(`net.ipv4.tcp_congestion_control`), whatever the host's default is (this VM's is BBR,
which ignores random loss): the cost model's loss-limited rate is Reno's (Mathis et al.),
CUBIC — the usual default on devices — behaves like Reno at a cell's RTTs (RFC 9438's
Reno-friendly region), and only Reno and the host's allowed list can be set inside a
namespace (tcp_allowed_congestion_control; CUBIC is not on it here).
Rules in a device's namespace vanish with it; `close()` stops the delayer (it holds a
socket in every namespace it serves) and removes the server's chain.

`ping` timestamps replies when they reach the interface, before netfilter holds them: it
shows only the far side's delay. `ping -U` (user-to-user), TCP and the relay see all of it.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pyroute2.netlink.exceptions import NetlinkError

from testbed.emulation.delayer import DelayerHandle
from testbed.emulation.nsutil import in_netns, netns_path, open_iproute
from testbed.emulation.shaping import Qdisc, ShapingPlan, handle_str, mbps_to_bps, queue_packets
from testbed.errors import ResourceError
from testbed.model.impairments import Impairment, LinkImpairment

__all__ = [
    "ImpairPath",
    "ImpairedLink",
    "NetemLeaf",
    "CHAIN",
    "plan_netem",
    "chain_rules",
    "remove_chain_rules",
    "server_queue",
    "Impairer",
]

ImpairPath = Literal["netem", "nfqueue+iptables", "none"]
CHAIN = "TB-IMPAIR"
CONGESTION_CONTROL = "reno"
DEVICE_QUEUE = 0
_FRAME_BYTES = 1514
_NETEM_MAJOR_OFFSET = 0x8000  # netem leaves get their own handles: `replace` grafts them over the pfifo


@dataclass(frozen=True)
class ImpairedLink:
    """What the impairer needs to know of one device link."""

    device_id: str
    address: str
    netns: str  # the device's namespace (name or path)
    index: int  # 0-based device position (the server namespace's queue is index + 1)


def server_queue(link: ImpairedLink) -> int:
    return link.index + 1


# ---------------------------------------------------------------------------------------
# netem: plan (pure)


@dataclass(frozen=True)
class NetemLeaf:
    """netem as the leaf qdisc of a device's HTB class, on one interface (one direction)."""

    ifname: str
    handle: int
    parent: int  # the device's HTB class
    delay_us: int
    jitter_us: int
    loss_pct: float
    limit_packets: int
    rate_bps: int | None = None  # set with jitter: keeps flows in order

    def describe(self) -> str:
        return (f"qdisc netem {handle_str(self.handle)} parent {handle_str(self.parent)} on {self.ifname} "
                f"delay {self.delay_us}us jitter {self.jitter_us}us loss {self.loss_pct:g}% limit {self.limit_packets}p")


def netem_handle(classid: int) -> int:
    return ((classid & 0xFFFF) + _NETEM_MAJOR_OFFSET) << 16


def plan_netem(plan: ShapingPlan, impairments: Mapping[str, LinkImpairment],
               rates: Mapping[str, tuple[float, float]]) -> list[NetemLeaf]:
    """One netem leaf per impaired device and direction; `rates`: device -> (up, down) Mbit/s.

    The leaf holds the class's 100 ms queue plus everything in flight during the delay."""
    leaves: list[NetemLeaf] = []
    for dev, imp in impairments.items():
        if imp.is_zero:
            continue
        classid = plan.classes[dev]
        up_mbps, down_mbps = rates[dev]
        for ifname, one, mbps in ((plan.down_ifname, imp.down, down_mbps), (plan.up_ifname, imp.up, up_mbps)):
            if one.is_zero:
                continue
            bps = mbps_to_bps(mbps)
            in_flight = math.ceil(bps / 8 * (one.delay_ms + one.jitter_ms) / 1e3 / _FRAME_BYTES)
            leaves.append(NetemLeaf(ifname, netem_handle(classid), classid, round(one.delay_ms * 1e3),
                                    round(one.jitter_ms * 1e3), one.loss_pct, queue_packets(bps) + in_flight,
                                    bps if one.jitter_ms > 0 else None))
    return leaves


def replaced_pfifos(ops: Iterable[Any], leaves: Iterable[NetemLeaf]) -> list[Qdisc]:
    """The shaping ops' pfifo leaves that netem leaves stand in for (not in the kernel)."""
    taken = {(leaf.ifname, leaf.parent) for leaf in leaves}
    return [op for op in ops if isinstance(op, Qdisc) and op.kind == "pfifo" and (op.ifname, op.parent) in taken]


async def _apply_netem(netns: str, leaves: Sequence[NetemLeaf], restore: Sequence[Qdisc] = ()) -> None:
    async with open_iproute(netns) as ipr:
        index: dict[str, int] = {}
        for op in [*leaves, *restore]:
            if op.ifname not in index:
                index[op.ifname] = (await ipr.link_lookup(ifname=op.ifname))[0]
            try:
                if isinstance(op, NetemLeaf):
                    kw: dict[str, Any] = dict(parent=op.parent, delay=op.delay_us, jitter=op.jitter_us,
                                              loss=op.loss_pct, limit=op.limit_packets)
                    if op.rate_bps is not None:
                        kw["rate"] = f"{op.rate_bps}bit"
                    await ipr.tc("replace", "netem", index[op.ifname], op.handle, **kw)
                else:  # back to the plain leaf (impairment removed)
                    await ipr.tc("replace", "pfifo", index[op.ifname], op.handle, parent=op.parent,
                                 limit=op.limit_packets)
            except NetlinkError as e:
                raise ResourceError(f"{op.describe()}: {e.args[-1] if e.args else e} (errno {e.code}); "
                                    "the kernel needs sch_netem (modprobe sch_netem)") from None


async def read_netem(netns: str, ifnames: Sequence[str]) -> list[NetemLeaf]:
    """The netem leaves in the kernel (rate not read back)."""
    from pyroute2.netlink.rtnl.tcmsg.common import tick_in_usec

    out: list[NetemLeaf] = []
    async with open_iproute(netns) as ipr:
        for name in ifnames:
            index = (await ipr.link_lookup(ifname=name))[0]
            async for q in await ipr.get_qdiscs(index):
                if q.get("TCA_KIND") != "netem":
                    continue
                o = q.get("TCA_OPTIONS")
                out.append(NetemLeaf(name, q["handle"], q["parent"], round(o["delay"] / tick_in_usec),
                                     round(o["jitter"] / tick_in_usec), round(o["loss"] * 100 / (2**32 - 1), 6),
                                     o["limit"]))
    return out


# ---------------------------------------------------------------------------------------
# nfqueue + iptables: plan (pure)


def _rules(source: str, one: Impairment, queue: int) -> list[str]:
    rules = []
    if one.loss_pct > 0:
        rules.append(f"-A {CHAIN} -s {source}/32 -m statistic --mode random "
                     f"--probability {one.loss_pct / 100:.10f} -j DROP")
    if one.delay_ms > 0 or one.jitter_ms > 0:
        rules.append(f"-A {CHAIN} -s {source}/32 -j NFQUEUE --queue-num {queue}")
    return rules


def chain_rules(entries: Iterable[tuple[str, Impairment, int]], *, hook: bool) -> str:
    """iptables-restore input that replaces the chain's rules: (source address, impairment of
    the packets from it, queue) each; `hook` also jumps to it from INPUT (first install)."""
    lines = ["*filter", f":{CHAIN} - [0:0]"]  # declaring the chain flushes it, even with --noflush
    for source, one, queue in entries:
        lines += _rules(source, one, queue)
    if hook:
        lines.append(f"-I INPUT 1 -j {CHAIN}")
    return "\n".join(lines + ["COMMIT", ""])


def remove_chain_rules() -> str:
    return "\n".join(["*filter", f":{CHAIN} - [0:0]", f"-D INPUT -j {CHAIN}", f"-X {CHAIN}", "COMMIT", ""])


def _iptables_restore(netns: str, text: str) -> None:
    if shutil.which("iptables-restore") is None or shutil.which("nsenter") is None:
        raise ResourceError("link impairments without sch_netem need iptables-restore and nsenter; "
                            "apt install iptables util-linux")
    r = subprocess.run(["nsenter", f"--net={netns_path(netns)}", "iptables-restore", "--noflush"],
                       input=text.encode(), capture_output=True, timeout=30)
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip()
        raise ResourceError(f"iptables in {netns}: {err or 'iptables-restore failed'}; link impairments without "
                            "sch_netem need the iptables `statistic` match and the NFQUEUE target (xt_statistic, "
                            "xt_NFQUEUE, nfnetlink_queue)")


# ---------------------------------------------------------------------------------------
# The cell's impairments


@dataclass
class Impairer:
    """Owns one cell's impairments. `rates` (device -> (up, down) Mbit/s) are needed for
    netem leaves only."""

    run_id: str
    server_netns: str
    server_address: str
    links: Sequence[ImpairedLink]
    netem_available: bool
    shaping: ShapingPlan | None = None
    log_path: Path | None = None
    force_path: ImpairPath | None = None  # tests and benchmarks: the fallback on a netem kernel
    path: ImpairPath = "none"
    current: dict[str, LinkImpairment] = field(default_factory=dict)
    delayer: DelayerHandle | None = None
    congestion_control: str | None = None  # None: the host's default (no impairment yet)
    _hooked: set[str] = field(default_factory=set)
    _queues: set[tuple[str, int]] = field(default_factory=set)
    _leaves: list[NetemLeaf] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_id = {link.device_id: link for link in self.links}

    def _choose_path(self) -> ImpairPath:
        if self.force_path is not None:
            if self.force_path == "netem" and not self.netem_available:
                raise ResourceError("impairments through netem were requested but this kernel has no sch_netem "
                                    "(modprobe sch_netem, or let the testbed use its nfqueue+iptables fallback)")
            return self.force_path
        return "netem" if self.netem_available and self.shaping is not None else "nfqueue+iptables"

    async def apply(self, impairments: Mapping[str, LinkImpairment],
                    rates: Mapping[str, tuple[float, float]] | None = None) -> None:
        """Set these devices' impairments (all at `up`, or a few live: mobility, faults)."""
        for dev in impairments:
            if dev not in self._by_id:
                raise ResourceError(f"impairment for unknown device {dev!r}; devices: {', '.join(self._by_id)}")
        new = {dev: LinkImpairment(imp.up.rounded(), imp.down.rounded()) for dev, imp in impairments.items()}
        changed = {dev: imp for dev, imp in new.items() if self.current.get(dev, LinkImpairment()) != imp}
        if not changed:
            return
        if self.path == "none":
            if all(imp.is_zero for imp in changed.values()):
                self.current.update(changed)
                return
            self.path = self._choose_path()
            await self._set_congestion_control()
        if self.path == "netem":
            await self._apply_netem(changed, rates or {})
        else:
            await self._apply_fallback(changed)
        self.current.update(changed)

    async def _set_congestion_control(self) -> None:
        def write() -> None:
            Path("/proc/sys/net/ipv4/tcp_congestion_control").write_text(CONGESTION_CONTROL)

        for netns in [self.server_netns, *(link.netns for link in self.links)]:
            try:
                await asyncio.to_thread(in_netns, netns, write)
            except OSError as e:
                raise ResourceError(f"{netns}: cannot set net.ipv4.tcp_congestion_control={CONGESTION_CONTROL} "
                                    f"({e.strerror}); the impairment model needs a loss-based TCP") from None
        self.congestion_control = CONGESTION_CONTROL

    # -- netem ----------------------------------------------------------------------------
    async def _apply_netem(self, changed: Mapping[str, LinkImpairment], rates: Mapping[str, tuple[float, float]]) -> None:
        assert self.shaping is not None
        leaves = plan_netem(self.shaping, changed, rates)
        cleared = [dev for dev, imp in changed.items() if imp.is_zero or imp.up.is_zero or imp.down.is_zero]
        restore = [op for op in self.shaping.ops if isinstance(op, Qdisc) and op.kind == "pfifo"
                   and op.parent in {self.shaping.classes[d] for d in cleared}
                   and (op.ifname, op.parent) not in {(leaf.ifname, leaf.parent) for leaf in leaves}]
        await _apply_netem(self.server_netns, leaves, restore)
        keep = [leaf for leaf in self._leaves if (leaf.ifname, leaf.parent) not in
                {(op.ifname, op.parent) for op in [*leaves, *restore]}]
        self._leaves = keep + leaves

    async def after_rate_change(self, rates: Mapping[str, tuple[float, float]], plan: ShapingPlan) -> None:
        """Rates changed (shaping replaced the devices' pfifo leaves): put netem back."""
        self.shaping = plan
        if self.path == "netem":
            leaves = plan_netem(self.shaping, self.current, rates)
            await _apply_netem(self.server_netns, leaves)
            self._leaves = leaves

    def shaping_ops_in_kernel(self, ops: Iterable[Any]) -> list[Any]:
        """The shaping plan's ops as the kernel holds them with these netem leaves."""
        ops = list(ops)
        gone = replaced_pfifos(ops, self._leaves)
        return [op for op in ops if op not in gone]

    async def verify(self) -> list[str]:
        """Differences between the planned netem leaves and the kernel (empty = as planned)."""
        if self.path != "netem" or self.shaping is None:
            return []
        seen = await read_netem(self.server_netns, [self.shaping.down_ifname, self.shaping.up_ifname])
        key = lambda x: (x.ifname, x.handle, x.parent, x.delay_us, x.jitter_us, round(x.loss_pct, 4), x.limit_packets)  # noqa: E731
        want, got = {key(x) for x in self._leaves}, {key(x) for x in seen}
        return ([f"missing: {x.describe()}" for x in self._leaves if key(x) not in got]
                + [f"unexpected: {x.describe()}" for x in seen if key(x) not in want])

    # -- nfqueue + iptables ---------------------------------------------------------------
    async def _apply_fallback(self, changed: Mapping[str, LinkImpairment]) -> None:
        for dev, imp in changed.items():
            link = self._by_id[dev]
            for netns, queue, one in ((link.netns, DEVICE_QUEUE, imp.down), (self.server_netns, server_queue(link), imp.up)):
                if one.delay_ms > 0 or one.jitter_ms > 0 or (netns, queue) in self._queues:
                    await self._queue(netns, queue, one)
        merged = self.current | dict(changed)
        jobs = [self._restore(self.server_netns, [(link.address, merged.get(dev, LinkImpairment()).up,
                                                    server_queue(link)) for dev, link in self._by_id.items()])]
        for dev, imp in changed.items():
            if self.current.get(dev, LinkImpairment()).down != imp.down:
                jobs.append(self._restore(self._by_id[dev].netns, [(self.server_address, imp.down, DEVICE_QUEUE)]))
        sem = asyncio.Semaphore(8)  # iptables-restore processes at once

        async def bounded(job):
            async with sem:
                await job

        await asyncio.gather(*(bounded(j) for j in jobs))

    async def _queue(self, netns: str, queue: int, one: Impairment) -> None:
        if self.delayer is None:
            log = str(self.log_path) if self.log_path is not None else None
            self.delayer = await asyncio.to_thread(DelayerHandle, self.run_id, log)
        op = "set" if (netns, queue) in self._queues else "add"
        await asyncio.to_thread(self.delayer.queue, op, netns_path(netns), queue, one.delay_ms, one.jitter_ms)
        self._queues.add((netns, queue))

    async def _restore(self, netns: str, entries: list[tuple[str, Impairment, int]]) -> None:
        hook = netns not in self._hooked
        await asyncio.to_thread(_iptables_restore, netns, chain_rules(entries, hook=hook))
        self._hooked.add(netns)

    # -- reporting and teardown -----------------------------------------------------------
    def delayer_stats(self) -> dict[str, Any] | None:
        if self.delayer is None:
            return None
        return self.delayer.request({"op": "stats"})

    def status(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "delayer_pid": self.delayer.pid if self.delayer is not None else None,
            "tcp_congestion_control": self.congestion_control or "host default",
            "devices": {dev: imp.to_json() for dev, imp in self.current.items() if not imp.is_zero},
        }

    async def close(self) -> list[str]:
        """Stop the delayer, remove the server's chain (device chains go with their namespaces)."""
        problems: list[str] = []
        if self.delayer is not None:
            try:
                await asyncio.to_thread(self.delayer.stop)
            except Exception as e:  # noqa: BLE001 - reported by the caller
                problems.append(f"delayer: {e}")
            self.delayer = None
        if self.server_netns in self._hooked:
            try:
                await asyncio.to_thread(_iptables_restore, self.server_netns, remove_chain_rules())
            except ResourceError as e:
                problems.append(str(e))
        self._hooked.clear()
        self._queues.clear()
        return problems
