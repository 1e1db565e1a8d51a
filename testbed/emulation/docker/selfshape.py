"""Shape this container's own link, drop to the device's uid, then become the given
command (compose / Swarm nodes).

In a compose or Swarm deployment no host process reaches into the containers, so each
device shapes itself, as root with NET_ADMIN: uplink = HTB on the egress of its eth0,
downlink = its eth0's ingress redirected to an IFB with HTB on the IFB's egress. The ops
are the shaping module's typed ops, applied by the same `shape()` function as everywhere
else. With `--user UID` it then becomes that node uid for good (node_uids.drop_privileges:
no capability left, no_new_privs) before it execs the command, so the agent never runs as
root.

    python -m testbed.emulation.docker.selfshape --up-mbps 20 --down-mbps 50 --user UID -- CMD ARG...
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from pyroute2.netlink.exceptions import NetlinkError

from testbed.emulation.node_uids import drop_privileges
from testbed.emulation.nsutil import open_iproute
from testbed.emulation.shaping import (
    CELL_CLASS,
    HTB_HANDLE,
    INGRESS_HANDLE,
    TC_H_INGRESS,
    TC_H_ROOT,
    HtbClass,
    Op,
    Qdisc,
    U32Filter,
    mbps_to_bps,
    shape,
)
from testbed.errors import ResourceError, ShapingError

__all__ = ["plan_self", "shape_self", "main"]


def plan_self(ifname: str, ifb: str, up_mbps: float, down_mbps: float) -> list[Op]:
    """One device's own link: every IP packet out of `ifname` at up_mbps, every packet
    into it (through `ifb`) at down_mbps. Pure."""
    if not (up_mbps > 0 and down_mbps > 0):
        raise ShapingError(f"rates must be > 0 Mbit/s (up {up_mbps}, down {down_mbps})")
    up, down = mbps_to_bps(up_mbps), mbps_to_bps(down_mbps)
    return [
        Qdisc(ifname, "htb", HTB_HANDLE, TC_H_ROOT),
        HtbClass(ifname, CELL_CLASS, HTB_HANDLE, up, up),
        U32Filter(ifname, HTB_HANDLE, 1, None, None, classid=CELL_CLASS),
        Qdisc(ifb, "htb", HTB_HANDLE, TC_H_ROOT),
        HtbClass(ifb, CELL_CLASS, HTB_HANDLE, down, down),
        U32Filter(ifb, HTB_HANDLE, 1, None, None, classid=CELL_CLASS),
        Qdisc(ifname, "ingress", INGRESS_HANDLE, TC_H_INGRESS),
        U32Filter(ifname, INGRESS_HANDLE, 1, None, None, redirect_ifname=ifb),
    ]


async def shape_self(up_mbps: float, down_mbps: float, ifname: str = "eth0", ifb: str = "ifb0") -> list[Op]:
    """Make `ifb` in this namespace and apply `plan_self`; returns the ops applied."""
    ops = plan_self(ifname, ifb, up_mbps, down_mbps)
    async with open_iproute(None) as ipr:
        if not await ipr.link_lookup(ifname=ifb):
            try:
                await ipr.link("add", ifname=ifb, kind="ifb", txqlen=1000)
            except NetlinkError as e:
                raise ShapingError(f"cannot make {ifb} ({e}); the container needs NET_ADMIN and the host the ifb module") from None
        await ipr.link("set", index=(await ipr.link_lookup(ifname=ifb))[0], state="up")
    await shape(None, ops)
    return ops


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    cmd: list[str] = []
    if "--" in args:
        i = args.index("--")
        args, cmd = args[:i], args[i + 1:]
    p = argparse.ArgumentParser(prog="docker_selfshape", description="shape eth0, then exec CMD")
    p.add_argument("--up-mbps", type=float, required=True)
    p.add_argument("--down-mbps", type=float, required=True)
    p.add_argument("--ifname", default="eth0")
    p.add_argument("--user", type=int, default=None, help="node uid to become before running CMD")
    a = p.parse_args(args)
    try:
        asyncio.run(shape_self(a.up_mbps, a.down_mbps, a.ifname))
    except ShapingError as e:
        print(f"docker_selfshape: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(f"docker_selfshape: {a.ifname} up {a.up_mbps:g} Mbit/s, down {a.down_mbps:g} Mbit/s", file=sys.stderr, flush=True)
    if a.user is not None:
        try:
            drop_privileges(a.user)
        except OSError as e:  # PermissionError included: no SETUID/SETGID capability, or not a node uid
            print(f"docker_selfshape: cannot become uid {a.user}: {e}", file=sys.stderr)
            sys.exit(ResourceError.exit_code)
    if cmd:
        os.chdir("/")
        os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
