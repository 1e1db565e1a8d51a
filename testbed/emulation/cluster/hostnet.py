"""The datacenter network of a cluster on this machine: a bridge in the root namespace
(with the host's address), one namespace per node with `eth0` on it, and the host's
iptables chain that lets the bridge forward (made, read back, removed).

The host's FORWARD chain may drop bridged traffic (a Docker daemon started with IP
forwarding off sets its policy to DROP, and br_netfilter sends bridged frames through
it): FORWARD jumps to the cluster's own chain `TBC-<name>` for frames from the bridge to
the bridge, and that chain accepts them. Nothing else of the host's rules is touched.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from testbed.emulation.backend import remove_root_links
from testbed.emulation.cluster.plan import ClusterPlan, NodePlan
from testbed.emulation.nsutil import create_netns, in_netns, list_netns, netns_path, open_iproute, remove_netns
from testbed.errors import ResourceError

__all__ = ["make_network", "remove_network", "read_network", "probe_vxlan", "chain_rules", "host_chains"]

def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    binary = shutil.which("iptables", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if binary is None:
        raise ResourceError("iptables is not installed; `apt-get install iptables`")
    r = subprocess.run([binary, "-w", "10", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise ResourceError(f"iptables {' '.join(args)}: {r.stderr.strip()}")
    return r


def _jump(plan: ClusterPlan) -> list[str]:
    return ["FORWARD", "-i", plan.bridge, "-o", plan.bridge, "-j", plan.chain]


def _make_chain(plan: ClusterPlan) -> None:
    if _iptables("-S", plan.chain, check=False).returncode != 0:
        _iptables("-N", plan.chain)
    _iptables("-F", plan.chain)
    _iptables("-A", plan.chain, "-j", "ACCEPT")
    if _iptables("-C", *_jump(plan), check=False).returncode != 0:
        _iptables("-I", *_jump(plan)[:1], "1", *_jump(plan)[1:])


def _remove_chain(name: str, bridge: str) -> list[str]:
    removed = []
    if shutil.which("iptables", path="/usr/sbin:/sbin:/usr/bin:/bin") is None:
        return removed
    while _iptables("-D", "FORWARD", "-i", bridge, "-o", bridge, "-j", name, check=False).returncode == 0:
        removed.append(f"iptables FORWARD jump to {name}")
    if _iptables("-S", name, check=False).returncode == 0:
        _iptables("-F", name)
        _iptables("-X", name)
        removed.append(f"iptables chain {name}")
    return removed


def chain_rules(plan: ClusterPlan) -> list[str]:
    """The cluster's chain as `iptables -S` prints it ([] when absent): read back."""
    r = _iptables("-S", plan.chain, check=False)
    return r.stdout.splitlines() if r.returncode == 0 else []


def host_chains(prefix: str = "TBC-") -> list[str]:
    """Chains of the host's filter table whose name starts with `prefix`."""
    r = _iptables("-S", check=False)
    return sorted({line.split()[1] for line in r.stdout.splitlines()
                   if line.startswith("-N ") and line.split()[1].startswith(prefix)})


async def _idx(ipr: AsyncIPRoute, ifname: str) -> int:
    found = await ipr.link_lookup(ifname=ifname)
    if not found:
        raise ResourceError(f"interface {ifname!r} was not created")
    return found[0]


def _forwarding_on() -> None:
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1")


async def _node(plan: ClusterPlan, node: NodePlan, br: int) -> None:
    sock = await create_netns(node.netns)
    fd = os.open(netns_path(node.netns), os.O_RDONLY)
    try:
        async with AsyncIPRoute() as root:
            await root.link("add", ifname=node.veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": fd})
            await root.link("set", index=await _idx(root, node.veth), master=br, state="up")
    finally:
        os.close(fd)
    async with open_iproute(sock=sock) as ns:
        await ns.link("set", index=await _idx(ns, "lo"), state="up")
        e = await _idx(ns, "eth0")
        await ns.addr("add", index=e, address=node.address, prefixlen=plan.prefixlen)
        await ns.link("set", index=e, state="up")
    # forwarding on before dockerd starts: it would otherwise turn it on and set the
    # namespace's FORWARD policy to DROP (as .ci/start-dockerd avoids on the host)
    await asyncio.to_thread(in_netns, node.netns, _forwarding_on)


async def make_network(plan: ClusterPlan) -> None:
    """Bridge (host address), node namespaces with eth0, the host's FORWARD chain."""
    async with AsyncIPRoute() as root:
        await root.link("add", ifname=plan.bridge, kind="bridge")
        br = await _idx(root, plan.bridge)
        await root.addr("add", index=br, address=plan.host_address, prefixlen=plan.prefixlen)
        await root.link("set", index=br, state="up")
    await asyncio.gather(*(_node(plan, n, br) for n in plan.nodes))
    await asyncio.to_thread(_make_chain, plan)


async def probe_vxlan(netns: str) -> None:
    """Make and delete a vxlan link in `netns`: Swarm's overlay networks need the module."""
    async with open_iproute(netns) as ns:
        try:
            await ns.link("add", ifname="tbcprobe", kind="vxlan", vxlan_id=4242, vxlan_port=4789)
        except NetlinkError as e:
            raise ResourceError(f"this kernel cannot make vxlan links ({e}); Swarm overlay networks need it: "
                                "`modprobe vxlan` (package linux-modules-extra on some distributions)") from None
        await ns.link("del", index=await _idx(ns, "tbcprobe"))


async def remove_network(name: str) -> list[str]:
    """Remove by name what make_network made for cluster `name` (also after a crash):
    the FORWARD jump and chain, the veths and the bridge, the namespaces."""
    bridge = f"tbc{name}-br"
    removed = await asyncio.to_thread(_remove_chain, f"TBC-{name}", bridge)
    removed += await remove_root_links(re.compile(rf"^tbc{re.escape(name)}-(br|\d+)$"))
    for ns in list_netns(f"tbc-{name}-"):
        if remove_netns(ns):
            removed.append(f"netns {ns}")
    return removed


async def read_network(plan: ClusterPlan) -> dict[str, object]:
    """What exists of the plan's network now: the bridge and its address, each node's
    eth0 address and master, the chain's rules (compared with the plan by tests)."""
    out: dict[str, object] = {"bridge": None, "nodes": {}, "chain": await asyncio.to_thread(chain_rules, plan)}
    async with AsyncIPRoute() as root:
        found = await root.link_lookup(ifname=plan.bridge)
        if found:
            addrs = [a.get("address") async for a in await root.addr("dump", index=found[0])]
            out["bridge"] = {"index": found[0], "addresses": addrs}
            masters = {}
            for n in plan.nodes:
                v = await root.link_lookup(ifname=n.veth)
                if v:
                    link = [x async for x in await root.link("get", index=v[0])][0]
                    masters[n.name] = link.get("master")
            out["masters"] = masters
    nodes: dict[str, object] = {}
    for n in plan.nodes:
        if n.netns not in list_netns("tbc-"):
            continue
        async with open_iproute(n.netns) as ns:
            e = await ns.link_lookup(ifname="eth0")
            nodes[n.name] = [a.get("address") async for a in await ns.addr("dump", index=e[0])] if e else []
    out["nodes"] = nodes
    return out
