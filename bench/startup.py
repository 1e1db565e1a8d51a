"""Network-only `up` and `down` wall time: testbed (netns backend) vs Mininet, side by side.

For 20, 100 and 200 devices: namespaces, links, shaping (HTB on every device) and cgroups
for the testbed; a star of hosts on a LinuxBridge with TCLink bandwidths and no controller
for Mininet (its Python API, run under the system python3 where Debian's `mininet` package
lives). Each size alternates the two, `--repeat` times; prints the medians and the ratio
testbed / Mininet (< 1: the testbed is faster). Needs root; leaves nothing behind.

`--agents FILE` times instead the whole `up` a generation waits for: the run owner brings the
topology up with its broker and real agents (forked by testbed/composition/agents.py into their
nodes) until every agent reported online, printed next to Mininet's network-only `up` of
as many hosts in the same run (target: within 3x).

    sudo .venv/bin/python bench/startup.py [--sizes 20 100 200] [--repeat 1]
    sudo .venv/bin/python bench/startup.py --agents topologies/paper.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from testbed.emulation import Emulation
from testbed.emulation.runs import cleanup_run
from testbed.model.topology import parse_topology

MININET_SCRIPT = r"""
import json, sys, time
from mininet.net import Mininet
from mininet.topo import Topo
from mininet.nodelib import LinuxBridge
from mininet.link import TCLink
from mininet.log import setLogLevel
setLogLevel("error")
n = int(sys.argv[1])
class Star(Topo):
    def build(self):
        s = self.addSwitch("s1")
        for i in range(n):
            self.addLink(self.addHost("h%d" % (i + 1)), s, bw=20)
t0 = time.perf_counter()
net = Mininet(topo=Star(), switch=LinuxBridge, link=TCLink, controller=None, autoSetMacs=True)
net.start()
up = time.perf_counter() - t0
t0 = time.perf_counter()
net.stop()
down = time.perf_counter() - t0
print(json.dumps({"up_s": up, "down_s": down}))
"""


def topo_text(n: int) -> str:
    return f"name: bench-{n}\nseed: 1\ndevices: {{count: {n}}}\ncell: {{shared_capacity: true}}\n"


async def testbed_once(n: int) -> dict[str, float]:
    run = "b" + uuid.uuid4().hex[:5]
    topo = parse_topology(topo_text(n))
    emu = Emulation(topo, run, mobility=False)
    try:
        t0 = time.perf_counter()
        await emu.__aenter__()
        up = time.perf_counter() - t0
        assert await emu.verify_shaping() == [], "shaping differs from the plan"
        t0 = time.perf_counter()
        await emu.__aexit__(None, None, None)
        down = time.perf_counter() - t0
    finally:
        cleanup_run(run)
    return {"up_s": up, "down_s": down, **{k: round(v, 4) for k, v in emu.timings_s.items()}}


def mininet_once(n: int) -> dict[str, float] | None:
    try:
        r = subprocess.run(["/usr/bin/python3", "-c", MININET_SCRIPT, str(n)], capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        return None
    if r.returncode != 0:
        print(f"mininet failed: {r.stderr[-500:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


async def agents_up_once(path: Path) -> dict[str, float]:
    """The whole `up` of a topology with its real agents, as a generation sees it: the run
    owner (emulation, per-run credentials, broker, agent template, one testbed-agent per
    device forked into its node) until every agent reported "online" over MQTT."""
    from testbed.composition.session import RunSession
    from testbed.model.topology import load_topology

    run = "a" + uuid.uuid4().hex[:5]
    topo = load_topology(path)
    try:
        t0 = time.perf_counter()
        async with RunSession(topo, run_id=run) as r:
            relay_s = time.perf_counter() - t0
            await r.ensure_agents(r.cell.device_ids())
            total = time.perf_counter() - t0
            emu_s = r.timings_s.get("cell_s", 0.0)
            template_s = r.timings_s.get("template_s", 0.0)
            n = len(r.cell.links)
    finally:
        cleanup_run(run)
    return {"devices": n,
            "up_with_agents_s": total, "emulation_s": emu_s, "template_s": template_s,
            "relay_started_s": relay_s, "agents_online_s": total - relay_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20, 100, 200])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--agents", type=Path, default=None, metavar="TOPOLOGY",
                    help="instead: full `up` of TOPOLOGY (e.g. topologies/paper.yaml) until every real "
                         "agent is online, next to Mininet's network-only up of as many hosts")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/startup.py needs root", file=sys.stderr)
        return 4
    if args.agents:
        rows = []
        for _ in range(args.repeat):
            a = asyncio.run(agents_up_once(args.agents))
            m = mininet_once(a["devices"])
            rows.append(a | {"mininet_up_s": m["up_s"] if m else None})
        a = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "mininet_up_s"}
        mn = [r["mininet_up_s"] for r in rows if r["mininet_up_s"] is not None]
        if args.json:
            print(json.dumps({"runs": rows, "median": a}, indent=2))
            return 0
        print(f"{args.agents.name}: {a['devices']:.0f} devices up with every real agent online in "
              f"{a['up_with_agents_s']:.2f} s (emulation {a['emulation_s']:.2f} s, agent template "
              f"{a['template_s']:.2f} s, relay started at {a['relay_started_s']:.2f} s, agents online "
              f"{a['agents_online_s']:.2f} s later)")
        if mn:
            m = statistics.median(mn)
            print(f"Mininet {a['devices']:.0f} hosts, network only: {m:.2f} s; ratio {a['up_with_agents_s'] / m:.2f} "
                  f"(target <= 3)")
        else:
            print("Mininet: not available (needs Debian's mininet package under /usr/bin/python3)")
        return 0
    rows = []
    for n in args.sizes:
        tb, mn = [], []
        for _ in range(args.repeat):
            tb.append(asyncio.run(testbed_once(n)))
            m = mininet_once(n)
            if m is not None:
                mn.append(m)
        row = {"devices": n,
               "testbed_up_s": statistics.median(x["up_s"] for x in tb),
               "testbed_down_s": statistics.median(x["down_s"] for x in tb),
               "testbed_parts_s": tb[-1]}
        if mn:
            row |= {"mininet_up_s": statistics.median(x["up_s"] for x in mn),
                    "mininet_down_s": statistics.median(x["down_s"] for x in mn)}
            row["up_ratio"] = row["testbed_up_s"] / row["mininet_up_s"]
            row["down_ratio"] = row["testbed_down_s"] / row["mininet_down_s"]
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'devices':>7} | {'testbed up s':>12} {'mininet up s':>12} {'ratio':>6} | "
          f"{'testbed down s':>14} {'mininet down s':>14} {'ratio':>6}")
    for r in rows:
        mu = f"{r['mininet_up_s']:12.3f}" if "mininet_up_s" in r else f"{'n/a':>12}"
        md = f"{r['mininet_down_s']:14.3f}" if "mininet_down_s" in r else f"{'n/a':>14}"
        ur = f"{r['up_ratio']:6.2f}" if "up_ratio" in r else f"{'':>6}"
        dr = f"{r['down_ratio']:6.2f}" if "down_ratio" in r else f"{'':>6}"
        print(f"{r['devices']:>7} | {r['testbed_up_s']:12.3f} {mu} {ur} | {r['testbed_down_s']:14.3f} {md} {dr}")
    print("testbed up = namespaces + links + HTB/IFB shaping + cgroups (+ netem probe); no broker, no agents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
