"""Start-up of a generation, cold and on a cell that is up, next to Mininet's 20-host `up`.

In one run (as root), on TOPOLOGY (default topologies/paper.yaml):

- cold: `testbed run TOPOLOGY` as a user types it, `--repeat` times;
- up: `testbed up TOPOLOGY` `--repeat` times, each until it returns (the cell usable:
  namespaces, links, shaping, broker) and then until its agents are warm (what `up --wait`
  waits for); the last one stays up for
- warm: `testbed run TOPOLOGY --run ID` `--repeat` times right after its agents are warm,
  then `testbed down`;
- Mininet: a star of as many hosts as the topology has devices on a LinuxBridge with
  TCLink bandwidths, no controller (network only; Debian's `mininet` under /usr/bin/python3).

For each it prints the medians of: the first stage (the first `stage_started` event's
`ts` minus the wall clock just before the command was started) and the command's wall
time, next to the targets (issue 28: cold <= 5 s / 7.5 s, warm <= 1.5 s / 4.5 s, `up` <= 2 x
Mininet's `up`, for a machine at rest) and as multiples of Mininet's `up` in the same run
(also a gauge of how busy the machine was), then where the start-up time went (the medians
of each run's `meta.startup` phases, seconds after the command started) and the load
average. All numbers are measured here.

`--network` instead times the network-only `up`/`down` (namespaces, links, shaping,
cgroups; no broker, no agents) against Mininet for `--sizes` devices.

    sudo .venv/bin/python bench/startup.py [--topology topologies/paper.yaml] [--repeat 3]
    sudo .venv/bin/python bench/startup.py --network [--sizes 20 100 200] [--repeat 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

TESTBED = [str(Path(sys.executable).parent / "testbed")]  # the console script, as a user starts it
TARGETS = {"cold": (5.0, 7.5), "warm": (1.5, 4.5)}  # first stage s, wall s (issue 28)
UP_TARGET = 2.0  # `testbed up` <= 2 x Mininet's `up` of as many hosts (issue 28)

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


def mininet_once(n: int) -> dict[str, float] | None:
    try:
        r = subprocess.run(["/usr/bin/python3", "-c", MININET_SCRIPT, str(n)], capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        return None
    if r.returncode != 0:
        print(f"mininet failed: {r.stderr[-500:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- generations -------------------------------------------------------------------------

def timed_run(topology: Path, out: Path, run_id: str | None = None) -> dict[str, Any]:
    """One `testbed run` as a user starts it: first stage and wall from outside the command."""
    argv = [*TESTBED, "run", str(topology), "--out", str(out), "--json"] + (["--run", run_id] if run_id else [])
    t0 = time.time()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv[2:])} failed ({r.returncode}): {r.stderr[-800:]}")
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if line.strip()]
    first = min(e["ts"] for e in events if e["type"] in ("stage_started", "run_started"))
    doc = json.loads((out / "result.json").read_text())
    return {"first_stage_s": first - t0, "wall_s": wall, "startup": doc["meta"]["startup"],
            "latency_s": doc["latency_s"]}


def wait_warm(run_id: str, timeout_s: float = 300.0) -> float:
    """Seconds until the up cell's worker serves and its warm agents are online (`up --wait`)."""
    from testbed.emulation.runs import read_state

    t0 = time.time()
    while time.time() - t0 < timeout_s:
        state, worker = read_state(run_id) or {}, read_state(run_id, "worker.json") or {}
        warm = set(state.get("warm") or [])
        online = sum(1 for n in state.get("nodes", []) if n.get("id") in warm and n.get("agent_online"))
        if state.get("worker") == "ready" and worker.get("warm_done") and online >= len(warm):
            return time.time() - t0
        time.sleep(0.02)
    raise SystemExit(f"run {run_id}: its agents were not warm within {timeout_s:g} s")


def _median_phases(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    names = {n for r in rows for n in r["startup"]["phases"]}
    out = {}
    for n in names:
        spans = [r["startup"]["phases"][n] for r in rows if n in r["startup"]["phases"]]
        out[n] = [statistics.median(s[0] for s in spans), statistics.median(s[1] for s in spans)]
    return dict(sorted(out.items(), key=lambda kv: kv[1][0]))


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"first_stage_s": statistics.median(r["first_stage_s"] for r in rows),
            "wall_s": statistics.median(r["wall_s"] for r in rows),
            "generation_s": statistics.median(r["latency_s"] for r in rows),
            "runs": [{k: round(r[k], 3) for k in ("first_stage_s", "wall_s")} for r in rows],
            "phases": _median_phases(rows)}


def bench_generations(topology: Path, repeat: int) -> dict[str, Any]:
    from testbed.emulation.runs import cleanup_run
    from testbed.model.radio import compute_links
    from testbed.model.topology import load_topology, place

    topo = load_topology(topology)
    devices = len(compute_links(topo, place(topo)))
    tmp = Path(tempfile.mkdtemp(prefix="tb-bench-startup-"))
    res: dict[str, Any] = {"topology": str(topology), "devices": devices, "load_before": os.getloadavg()}
    res["cold"] = summarize([timed_run(topology, tmp / f"cold{i}") for i in range(repeat)])
    ups, warms = [], []
    for i in range(repeat):
        run_id = "w" + uuid.uuid4().hex[:5]
        t0 = time.time()
        up = subprocess.run([*TESTBED, "up", str(topology), "--run", run_id, "--json"], capture_output=True, text=True,
                            timeout=300)
        try:
            if up.returncode != 0:
                raise SystemExit(f"testbed up failed ({up.returncode}): {up.stderr[-800:]}")
            ups.append(time.time() - t0)
            warms.append(wait_warm(run_id) + ups[-1])
            if i == repeat - 1:
                res["warm"] = summarize([timed_run(topology, tmp / f"warm{j}", run_id) for j in range(repeat)])
        finally:
            subprocess.run([*TESTBED, "down", "--run", run_id], capture_output=True, timeout=120)
            cleanup_run(run_id)
    res["up_s"], res["up_runs"] = statistics.median(ups), [round(u, 3) for u in ups]
    res["warm_after_s"] = statistics.median(warms)
    m = [x for x in (mininet_once(devices) for _ in range(repeat)) if x is not None]
    res["mininet_up_s"] = statistics.median(x["up_s"] for x in m) if m else None
    res["load_after"] = os.getloadavg()
    return res


def print_generations(res: dict[str, Any]) -> None:
    print(f"{res['topology']}: {res['devices']} devices; load average before {res['load_before'][0]:.2f}, "
          f"after {res['load_after'][0]:.2f} (2 cores)")
    mn = res["mininet_up_s"]
    print(f"{'':6} | {'first stage s':>13} {'target':>7} {'/Mininet':>8} | {'wall s':>7} {'target':>7} {'/Mininet':>8} "
          f"| runs (first stage, wall)")
    for path in ("cold", "warm"):
        s, (t_first, t_wall) = res[path], TARGETS[path]
        runs = ", ".join(f"({r['first_stage_s']:.2f}, {r['wall_s']:.2f})" for r in s["runs"])
        ratio = (lambda v: f"{v / mn:8.2f}" if mn else f"{'n/a':>8}")
        print(f"{path:6} | {s['first_stage_s']:13.2f} {t_first:7.1f} {ratio(s['first_stage_s'])} | {s['wall_s']:7.2f} "
              f"{t_wall:7.1f} {ratio(s['wall_s'])} | {runs}")
    print(f"Mininet {res['devices']} hosts up (network only): " + (f"{mn:.2f} s" if mn is not None else
          "not available (needs Debian's mininet package under /usr/bin/python3)"))
    ratio = f"{res['up_s'] / mn:.2f} x Mininet (target <= {UP_TARGET:g})" if mn else "n/a x Mininet"
    print(f"`testbed up` returned after {res['up_s']:.2f} s ({ratio}; runs {res['up_runs']}); its agents were warm "
          f"{res['warm_after_s']:.2f} s after the command started; the generation itself (emulated): "
          f"{res['cold']['generation_s']:.2f} s")
    for path in ("cold", "warm"):
        print(f"{path} start-up, medians, seconds after the command started [start, end]:")
        for name, (a, b) in res[path]["phases"].items():
            print(f"  {name:14} {a:6.2f} {b:6.2f}  ({b - a:.2f} s)")


# -- network only ----------------------------------------------------------------------

def topo_text(n: int) -> str:
    return f"name: bench-{n}\nseed: 1\ndevices: {{count: {n}}}\ncell: {{shared_capacity: true}}\n"


async def network_once(n: int) -> dict[str, float]:
    from testbed.emulation import Emulation
    from testbed.emulation.runs import cleanup_run
    from testbed.model.topology import parse_topology

    run = "b" + uuid.uuid4().hex[:5]
    emu = Emulation(parse_topology(topo_text(n)), run, mobility=False)
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
    return {"up_s": up, "down_s": down}


def bench_network(sizes: list[int], repeat: int) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        tb = [asyncio.run(network_once(n)) for _ in range(repeat)]
        mn = [x for x in (mininet_once(n) for _ in range(repeat)) if x is not None]
        row: dict[str, Any] = {"devices": n, "testbed_up_s": statistics.median(x["up_s"] for x in tb),
                               "testbed_down_s": statistics.median(x["down_s"] for x in tb)}
        if mn:
            row |= {"mininet_up_s": statistics.median(x["up_s"] for x in mn),
                    "mininet_down_s": statistics.median(x["down_s"] for x in mn)}
        rows.append(row)
    return rows


def print_network(rows: list[dict[str, Any]]) -> None:
    print(f"{'devices':>7} | {'testbed up s':>12} {'mininet up s':>12} {'ratio':>6} | "
          f"{'testbed down s':>14} {'mininet down s':>14} {'ratio':>6}")
    for r in rows:
        mu, md = r.get("mininet_up_s"), r.get("mininet_down_s")
        print(f"{r['devices']:>7} | {r['testbed_up_s']:12.3f} " + (f"{mu:12.3f} {r['testbed_up_s'] / mu:6.2f}"
              if mu else f"{'n/a':>12} {'':>6}") + f" | {r['testbed_down_s']:14.3f} "
              + (f"{md:14.3f} {r['testbed_down_s'] / md:6.2f}" if md else f"{'n/a':>14} {'':>6}"))
    print("testbed up = namespaces + links + HTB/IFB shaping + cgroups; no broker, no agents")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", type=Path, default=Path("topologies/paper.yaml"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--network", action="store_true", help="network-only up/down vs Mininet for --sizes")
    ap.add_argument("--sizes", type=int, nargs="+", default=[20, 100, 200])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/startup.py needs root", file=sys.stderr)
        return 4
    if args.network:
        rows = bench_network(args.sizes, args.repeat)
        print(json.dumps(rows, indent=2)) if args.json else print_network(rows)
        return 0
    res = bench_generations(args.topology, args.repeat)
    print(json.dumps(res, indent=2)) if args.json else print_generations(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
