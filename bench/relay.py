"""Relay benchmarks (issue 5 targets), measured side by side in one run; needs root.

1. overhead: measured latent transfer time / ideal (payload bytes x 8 / shaped rate) for
   the 256 KB relay message at 5, 10, 20, 50, 100 Mbit/s, down and up (target <= 1.10);
2. prediction: |predicted - measured| / predicted of the transfer times (t_down + t_up,
   summed over a run) and of the whole run's latency, in `compute: profile` mode, on
   topologies/small.yaml and topologies/paper.yaml (target <= 10 %);
3. memory: PSS of the paper scenario (20 agents with the tiny model, broker, the
   orchestrator's process, the agent template) after a generation (target < 6 GB).

    .venv/bin/python bench/relay.py [--reps 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from testbed.composition.session import RunSession  # noqa: E402
from testbed.composition.strategies import Multistage  # noqa: E402
from testbed.model.topology import load_topology  # noqa: E402

RATES_MBPS = (5, 10, 20, 50, 100)


def pss_kb(pid: int) -> int | None:
    """Proportional set size of a process (shared pages split among their users)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def overhead(reps: int, out: Path) -> list[dict]:
    topo = load_topology(REPO / "topologies/small.yaml")
    rows = []
    async with RunSession(topo, out_dir=out / "overhead") as r:
        await r.ensure_agents(r.cell.device_ids())
        dev = "dev03"  # the quickest stage (0.4 s of profile compute)
        for rate in RATES_MBPS:
            await r.cell.set_links({dev: (float(rate), float(rate))})
            downs, ups = [], []
            for _ in range(reps):
                doc = (await r.run(Multistage(order=[dev]))).to_json()
                (st,) = doc["stages"]
                ideal_down = st["bytes_down"] * 8 / (rate * 1e6)
                ideal_up = st["bytes_up"] * 8 / (rate * 1e6)
                downs.append(st["t_down_s"] / ideal_down)
                ups.append(st["t_up_s"] / ideal_up)
            rows.append({"rate_mbps": rate, "ideal_s": 262144 * 8 / (rate * 1e6),
                         "ratio_down": statistics.median(downs), "ratio_up": statistics.median(ups),
                         "ratio_max": max(downs + ups)})
    return rows


async def prediction_and_memory(name: str, reps: int, out: Path, memory: bool) -> dict:
    topo = load_topology(REPO / f"topologies/{name}.yaml")
    res: dict = {"topology": name, "runs": []}
    async with RunSession(topo, out_dir=out / name) as r:
        t0 = time.monotonic()
        await r.ensure_agents(r.cell.device_ids())
        res["agents_online_s"] = time.monotonic() - t0
        res["template_start_s"] = r.timings_s.get("template_s")
        for _ in range(reps):
            doc = (await r.run()).to_json()
            pred_x = sum(s["predicted"]["t_down_s"] + s["predicted"]["t_up_s"] for s in doc["stages"])
            meas_x = sum(s["t_down_s"] + s["t_up_s"] for s in doc["stages"])
            res["runs"].append({
                "selected": doc["selected"],
                "transfer_pred_s": pred_x, "transfer_meas_s": meas_x,
                "transfer_err": abs(meas_x - pred_x) / pred_x,
                "latency_pred_s": doc["predicted_latency_s"], "latency_meas_s": doc["latency_s"],
                "latency_err": abs(doc["latency_s"] - doc["predicted_latency_s"]) / doc["predicted_latency_s"],
                "overrun_s": sum(s["overrun_s"] for s in doc["stages"]),
                "rates_mbps": None,
            })
        if memory:
            agents = {d: pss_kb(p) for d, p in r.agents.pids().items()}
            others = {"broker": r.cell.broker.pid, "run owner+orchestrator": os.getpid(),
                      "agent template": r.template_pid}
            other_pss = {k: pss_kb(p) for k, p in others.items() if p}
            vals = [v for v in agents.values() if v]
            res["memory"] = {
                "agents": len(agents),
                "agent_pss_mb_median": statistics.median(vals) / 1024 if vals else None,
                "agent_pss_mb_max": max(vals) / 1024 if vals else None,
                "agent_rss_mb_median": statistics.median([rss_kb(p) or 0 for p in r.agents.pids().values()]) / 1024,
                "others_pss_mb": {k: (v or 0) / 1024 for k, v in other_pss.items()},
                "total_pss_mb": (sum(vals) + sum(v or 0 for v in other_pss.values())) / 1024,
            }
    return res


def _print(report: dict) -> None:
    print("relay overhead: measured / ideal transfer time of the 256 KB message (target <= 1.10)")
    print(f"{'rate Mbit/s':>11} {'ideal ms':>9} {'down':>6} {'up':>6} {'worst':>6}")
    for row in report["overhead"]:
        print(f"{row['rate_mbps']:>11} {row['ideal_s'] * 1e3:>9.1f} {row['ratio_down']:>6.3f} {row['ratio_up']:>6.3f} "
              f"{row['ratio_max']:>6.3f}")
    print("\nprediction error, compute: profile (target <= 10 %)")
    print(f"{'topology':>8} {'selected':>22} {'xfer pred s':>11} {'xfer meas s':>11} {'err':>6} "
          f"{'lat pred s':>10} {'lat meas s':>10} {'err':>6}")
    for p in report["prediction"]:
        for run in p["runs"]:
            print(f"{p['topology']:>8} {','.join(run['selected']):>22} {run['transfer_pred_s']:>11.4f} "
                  f"{run['transfer_meas_s']:>11.4f} {run['transfer_err'] * 100:>5.1f}% {run['latency_pred_s']:>10.3f} "
                  f"{run['latency_meas_s']:>10.3f} {run['latency_err'] * 100:>5.1f}%")
        print(f"{p['topology']:>8} agents online after {p['agents_online_s']:.1f} s "
              f"(template ready after {p['template_start_s'] or 0:.1f} s)")
    m = report.get("memory")
    if m:
        print(f"\nmemory, paper scenario ({m['agents']} agents, target < 6 GB total PSS)")
        print(f"agent PSS median {m['agent_pss_mb_median']:.1f} MB, max {m['agent_pss_mb_max']:.1f} MB "
              f"(RSS median {m['agent_rss_mb_median']:.1f} MB: shared pages counted in every process)")
        for k, v in m["others_pss_mb"].items():
            print(f"{k} PSS {v:.1f} MB")
        print(f"total PSS {m['total_pss_mb']:.1f} MB")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--skip", action="append", default=[], choices=["overhead", "small", "paper"])
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/relay.py needs root (namespaces, tc, cgroups)")
    report: dict = {"overhead": [], "prediction": []}
    with tempfile.TemporaryDirectory(prefix="tb-bench-relay-") as tmp:
        out = Path(tmp)
        if "overhead" not in args.skip:
            report["overhead"] = await overhead(args.reps, out)
        if "small" not in args.skip:
            report["prediction"].append(await prediction_and_memory("small", args.reps, out, memory=False))
        if "paper" not in args.skip:
            paper = await prediction_and_memory("paper", args.reps, out, memory=True)
            report["memory"] = paper.pop("memory", None)
            report["prediction"].append(paper)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)


if __name__ == "__main__":
    asyncio.run(main())
