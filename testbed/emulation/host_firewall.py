"""The host accepts nothing from a cell but the replies to what the host itself opened.

A device reaches the host's root namespace through the run's host-side interface (netns:
the host link `tb<run>h`, 198.18.255.254/32; docker: the network's bridge `tb<run>br`,
whose host address is the same). The testbed serves nothing there — the broker listens in
the edge server's node, the agents are forked into their nodes from the host — so a
per-run chain on the host's INPUT, for IPv4 and IPv6, accepts only packets of connections
the host opened (the TUI attaching to the broker, a probe) and drops everything else that
arrives on that interface: a listener on the host's wildcard address is not reachable from
a device. Made when the cell is up (`install`), removed with it (`remove`, also what
`testbed down` runs for a crashed run).

    iptables -N TB-<run>-IN
    iptables -A TB-<run>-IN -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    iptables -A TB-<run>-IN -j DROP
    iptables -I INPUT 1 -i <interface> -j TB-<run>-IN          (the same with ip6tables)
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess

from testbed.errors import ResourceError
from testbed.model.names import RUN_ID_CHARS, check_run_id

__all__ = ["chain_name", "install_rules", "installed_runs", "install", "remove", "TOOLS"]

#: iptables for IPv4, ip6tables for IPv6 (a device has an IPv6 link-local address too).
TOOLS = ("iptables", "ip6tables")
_CHAIN_RE = re.compile(rf"^-N TB-({RUN_ID_CHARS})-IN$")


def chain_name(run_id: str) -> str:
    return f"TB-{check_run_id(run_id)}-IN"


def install_rules(run_id: str, ifname: str) -> str:
    """iptables-restore input (--noflush) that makes the run's chain and hooks it on INPUT."""
    if not re.fullmatch(r"[A-Za-z0-9]{1,15}", ifname):
        raise ResourceError(f"host firewall: {ifname!r} is not an interface name")
    chain = chain_name(run_id)
    return "\n".join(["*filter", f":{chain} - [0:0]",  # declaring it flushes it, with --noflush too
                      f"-A {chain} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                      f"-A {chain} -j DROP",
                      f"-I INPUT 1 -i {ifname} -j {chain}", "COMMIT", ""])


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)


def _install_sync(run_id: str, ifname: str) -> None:
    for tool in TOOLS:
        if shutil.which(f"{tool}-restore") is None:
            raise ResourceError(f"the host firewall of a cell needs {tool}-restore; apt-get install iptables")
        _remove_one(tool, run_id)  # a reopened run: never two hooks
        r = _run([f"{tool}-restore", "-w", "--noflush"], install_rules(run_id, ifname))
        if r.returncode != 0:
            raise ResourceError(f"host firewall of run {run_id} ({tool}): {r.stderr.strip() or 'failed'}; it needs the "
                                "conntrack match (nf_conntrack, xt_conntrack or nf_tables' ct)")


def _remove_one(tool: str, run_id: str) -> bool:
    """Unhook and delete the run's chain from `tool`'s filter table; whether it existed."""
    chain = chain_name(run_id)
    listing = _run([tool, "-w", "-S", "INPUT"])
    for line in listing.stdout.splitlines():
        if line.startswith("-A INPUT ") and line.split()[-1] == chain and " -j " in line:
            _run([tool, "-w", "-D", *line.split()[1:]])
    if _run([tool, "-w", "-S", chain]).returncode != 0:
        return False
    _run([tool, "-w", "-F", chain])
    r = _run([tool, "-w", "-X", chain])
    if r.returncode != 0:
        raise ResourceError(f"host firewall of run {run_id} ({tool}): cannot delete chain {chain}: {r.stderr.strip()}")
    return True


def _remove_sync(run_id: str) -> list[str]:
    removed = []
    for tool in TOOLS:
        if shutil.which(tool) is not None and _remove_one(tool, run_id):
            removed.append(f"{tool} chain {chain_name(run_id)}")
    return removed


def installed_runs() -> set[str]:
    """Runs whose chain exists in the host's filter table (what `testbed down --all` finds)."""
    found: set[str] = set()
    for tool in TOOLS:
        if shutil.which(tool) is None:
            continue
        for line in _run([tool, "-w", "-S"]).stdout.splitlines():
            if m := _CHAIN_RE.match(line.strip()):
                found.add(m.group(1))
    return found


async def install(run_id: str, ifname: str) -> None:
    """Drop everything from `ifname` on the host but replies to the host's own connections."""
    await asyncio.to_thread(_install_sync, run_id, ifname)


async def remove(run_id: str) -> list[str]:
    """Remove the run's chains (idempotent); what was removed."""
    return await asyncio.to_thread(_remove_sync, run_id)
