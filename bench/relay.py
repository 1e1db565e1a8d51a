"""Relay benchmarks and the calibration of the cost model, measured side by side; needs root.

1. overhead: measured latent transfer time / ideal (payload bytes x 8 / shaped rate) for
   the 256 KB relay message at 5-200 Mbit/s, down and up (target <= 1.10), on
   topologies/small.yaml's dev03;
2. prediction: |predicted - measured| / predicted of the transfer times (t_down + t_up,
   summed over a run's stages) and of the whole run's latency, in `compute: profile`, on
   topologies/small.yaml and on topologies/paper.yaml at the placements of `--seeds`
   (target <= 10 %);
3. memory: PSS of the paper scenario (20 agents with the tiny model, broker, the
   orchestrator's process, the agent template) after a generation (target < 6 GB);
4. `--calibrate`: the relay's constants of the cost model (selection/costs.py
   RELAY_CALIBRATION), fitted on parts 1 and 2 of topologies/small.yaml only — never on
   paper.yaml, where the model is judged — plus the wire codec timed in this process;
   prints the block to paste into costs.py.

    .venv/bin/python bench/relay.py [--reps 3] [--seeds 1] [--json]
    .venv/bin/python bench/relay.py --calibrate --reps 8 --skip paper
    .venv/bin/python bench/relay.py --skip overhead --skip small --seeds 2,3,4 --reps 3
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

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from testbed.composition.session import RunSession  # noqa: E402
from testbed.methods.multistage.strategy import Multistage  # noqa: E402
from testbed.model.impairments import link_impairments  # noqa: E402
from testbed.model.profiles import load_profiles  # noqa: E402
from testbed.model.topology import load_topology  # noqa: E402
from testbed.relay.wire import Message, decode, encode  # noqa: E402
from testbed.selection.costs import DEFAULT_LINK_EFFICIENCY, RELAY_CALIBRATION  # noqa: E402
from testbed.selection.transfer import tcp_transfer_time_s  # noqa: E402

RATES_MBPS = (5, 20, 50, 100, 200)
MIN_FIT_RATE_MBPS = 20
CODEC_SIZES = (262_144, 1_000_000, 4_000_000, 14_000_000)


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


def run_sample(doc: dict, facts: dict) -> dict:
    """One run's measured times next to the link-only model (tcp at the shaped rate x link
    efficiency, no per-message term), and the time between its stages: what the calibration fits."""
    stages, eff = [], DEFAULT_LINK_EFFICIENCY
    for st in doc["stages"]:
        up, down = facts["rates"][st["device"]]
        imp = facts["impairments"][st["device"]]
        stages.append({
            "device": st["device"], "rate_mbps": min(up, down), "bytes": st["bytes_up"],
            "cores": facts["cores"][st["device"]], "overrun_s": st["overrun_s"],
            "t_down_s": st["t_down_s"], "t_up_s": st["t_up_s"], "t_cmp_s": st["t_cmp_s"],
            "link_down_s": tcp_transfer_time_s(st["bytes_down"], down * 1e6 * eff, imp.down, imp.up),
            "link_up_s": tcp_transfer_time_s(st["bytes_up"], up * 1e6 * eff, imp.up, imp.down),
            "profile_cmp_s": st["predicted"]["t_cmp_s"] - RELAY_CALIBRATION.pad_late_s,
        })
    return {"stages": stages,
            "between_s": doc["latency_s"] - sum(s["t_down_s"] + s["t_cmp_s"] + s["t_up_s"] for s in doc["stages"])}


def _session_facts(r: RunSession) -> dict:
    """Each device's shaped rates (up, down), impairments and CPU quota, as the cell applies them now."""
    profiles = load_profiles()
    links = r.current_links()
    return {"rates": {lk.id: (lk.rate_up_mbps, lk.rate_down_mbps) for lk in links},
            "impairments": link_impairments(r.topology, links) | r.cell.impairments,
            "cores": {lk.id: profiles[lk.profile].cpu_cores for lk in links}}


async def overhead(reps: int, out: Path, samples: list) -> list[dict]:
    topo = load_topology(REPO / "topologies/small.yaml")
    rows = []
    async with RunSession(topo, out_dir=out / "overhead") as r:
        await r.ensure_agents(r.cell.device_ids())
        dev = "dev03"  # the quickest stage (0.4 s of profile compute)
        for rate in RATES_MBPS:
            await r.cell.set_links({dev: (float(rate), float(rate))})
            facts = _session_facts(r)
            downs, ups = [], []
            for _ in range(reps):
                doc = (await r.run(Multistage(order=[dev]))).to_json()
                (st,) = doc["stages"]
                samples.append(run_sample(doc, facts))
                downs.append(st["t_down_s"] / (st["bytes_down"] * 8 / (rate * 1e6)))
                ups.append(st["t_up_s"] / (st["bytes_up"] * 8 / (rate * 1e6)))
            rows.append({"rate_mbps": rate, "ideal_s": 262144 * 8 / (rate * 1e6),
                         "ratio_down": statistics.median(downs), "ratio_up": statistics.median(ups),
                         "ratio_max": max(downs + ups)})
    return rows


async def prediction_and_memory(name: str, reps: int, out: Path, memory: bool, seed: int | None = None,
                                samples: list | None = None) -> dict:
    topo = load_topology(REPO / f"topologies/{name}.yaml", seed=seed)
    res: dict = {"topology": name, "seed": topo.seed, "runs": []}
    async with RunSession(topo, out_dir=out / f"{name}-{topo.seed}") as r:
        t0 = time.monotonic()
        await r.ensure_agents(r.cell.device_ids())
        res["agents_online_s"] = time.monotonic() - t0
        res["template_start_s"] = r.timings_s.get("template_s")
        facts = _session_facts(r)
        for _ in range(reps):
            doc = (await r.run()).to_json()
            if samples is not None:
                samples.append(run_sample(doc, facts))
            pred_x = sum(s["predicted"]["t_down_s"] + s["predicted"]["t_up_s"] for s in doc["stages"])
            meas_x = sum(s["t_down_s"] + s["t_up_s"] for s in doc["stages"])
            res["runs"].append({
                "selected": doc["selected"],
                "transfer_pred_s": pred_x, "transfer_meas_s": meas_x,
                "transfer_err": abs(meas_x - pred_x) / pred_x,
                "latency_pred_s": doc["predicted_latency_s"], "latency_meas_s": doc["latency_s"],
                "latency_err": abs(doc["latency_s"] - doc["predicted_latency_s"]) / doc["predicted_latency_s"],
                "t_max_s": doc["t_max_s"], "within_t_max": doc["within_budget"]["latency"],
                "overrun_s": sum(s["overrun_s"] for s in doc["stages"]),
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


def codec_times(reps: int = 20) -> list[dict]:
    """wire.encode and wire.decode (with its checks) of a latent padded to each size, in this process."""
    latent = np.random.default_rng(0).standard_normal((1, 4, 32, 32)).astype(np.float32)
    rows = []
    for size in CODEC_SIZES:
        msg = Message(kind="result", run="bench", device="dev01", stage=0, attempt=1, steps=(0, 5), total_steps=15,
                      tensors={"latent": latent}, meta={"t_send": 0.0})
        enc, dec = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            data = bytes(encode(msg, pad_to_bytes=size))
            t1 = time.perf_counter()
            decode(data, max_bytes=size + 2**20, run="bench", kind="result")
            dec.append(time.perf_counter() - t1)
            enc.append(t1 - t0)
        rows.append({"bytes": size, "encode_s": statistics.median(enc), "decode_s": statistics.median(dec)})
    return rows


def fit_calibration(codec: list[dict], samples: list[dict]) -> dict:
    """RELAY_CALIBRATION's constants (module docstring). A run is judged on its sums, so each
    constant is the median over runs of the run's mean per message (per stage); runs on
    links below MIN_FIT_RATE_MBPS are left out (the relay's links run at 50-300 Mbit/s, and
    at 5 Mbit/s a 1 % error of the link efficiency alone is 4 ms)."""
    # per MB: the median over sizes (a 14 MB buffer's first touch of fresh pages would dominate a least-squares fit)
    per_mb = {k: statistics.median(r[k] / (r["bytes"] / 1e6) for r in codec) for k in ("encode_s", "decode_s")}

    def enc(nbytes: int, cores: float = 1.0) -> float:
        return per_mb["encode_s"] * nbytes / 1e6 / min(1.0, cores)

    def dec(nbytes: int) -> float:
        return per_mb["decode_s"] * nbytes / 1e6

    runs = [r for r in samples if min(s["rate_mbps"] for s in r["stages"]) >= MIN_FIT_RATE_MBPS]
    message, handling, late, down, up = [], [], [], [], []
    for r in runs:
        st = r["stages"]
        d = [s["t_down_s"] - s["link_down_s"] for s in st]
        u = [s["t_up_s"] - s["link_up_s"] - enc(s["bytes"], s["cores"]) for s in st]
        down += d
        up += u
        message.append(statistics.fmean(d + u))
        handling.append(r["between_s"] / len(st) - enc(st[0]["bytes"]) - dec(st[0]["bytes"]))
        padded = [s["t_cmp_s"] - s["profile_cmp_s"] for s in st if not s["overrun_s"]]
        if padded:
            late.append(statistics.fmean(padded))
    ms = (lambda xs: [round(x * 1e3, 2) for x in xs])
    return {
        "encode_s_per_mb": per_mb["encode_s"], "decode_s_per_mb": per_mb["decode_s"],
        "message_overhead_s": statistics.median(message), "relay_handling_s": statistics.median(handling),
        "pad_late_s": statistics.median(late),
        "message_ms": ms(message), "handling_ms": ms(handling), "pad_late_ms": ms(late),
        "residual_down_ms": ms(down), "residual_up_ms": ms(up),
        "runs": len(runs), "runs_left_out": len(samples) - len(runs), "load_average": os.getloadavg(),
    }


def _quartiles(xs: list[float]) -> str:
    q = np.percentile(xs, [25, 50, 75])
    return f"median {q[1]:.2f} ms (quartiles {q[0]:.2f}-{q[2]:.2f}, n={len(xs)})"


def _print(report: dict) -> None:
    if report["overhead"]:
        print("relay overhead: measured / ideal transfer time of the 256 KB message (target <= 1.10)")
        print(f"{'rate Mbit/s':>11} {'ideal ms':>9} {'down':>6} {'up':>6} {'worst':>6}")
        for row in report["overhead"]:
            print(f"{row['rate_mbps']:>11} {row['ideal_s'] * 1e3:>9.1f} {row['ratio_down']:>6.3f} "
                  f"{row['ratio_up']:>6.3f} {row['ratio_max']:>6.3f}")
    if report["prediction"]:
        print("\nprediction error, compute: profile (target <= 10 %); modelled vs measured")
        print(f"{'topology':>8} {'seed':>4} {'selected':>22} {'xfer pred s':>11} {'xfer meas s':>11} {'err':>6} "
              f"{'lat pred s':>10} {'lat meas s':>10} {'err':>6} {'<=T_max':>7}")
    for p in report["prediction"]:
        for run in p["runs"]:
            print(f"{p['topology']:>8} {p['seed']:>4} {','.join(run['selected']):>22} {run['transfer_pred_s']:>11.4f} "
                  f"{run['transfer_meas_s']:>11.4f} {run['transfer_err'] * 100:>5.1f}% {run['latency_pred_s']:>10.3f} "
                  f"{run['latency_meas_s']:>10.3f} {run['latency_err'] * 100:>5.1f}% {str(run['within_t_max']):>7}")
        errs = [run["transfer_err"] for run in p["runs"]]
        print(f"{p['topology']:>8} {p['seed']:>4} transfer error median {statistics.median(errs) * 100:.1f} %; "
              f"agents online after {p['agents_online_s']:.1f} s "
              f"(template ready after {p['template_start_s'] or 0:.1f} s)")
    m = report.get("memory")
    if m:
        print(f"\nmemory, paper scenario ({m['agents']} agents, target < 6 GB total PSS)")
        print(f"agent PSS median {m['agent_pss_mb_median']:.1f} MB, max {m['agent_pss_mb_max']:.1f} MB "
              f"(RSS median {m['agent_rss_mb_median']:.1f} MB: shared pages counted in every process)")
        for k, v in m["others_pss_mb"].items():
            print(f"{k} PSS {v:.1f} MB")
        print(f"total PSS {m['total_pss_mb']:.1f} MB")
    c = report.get("calibration")
    if c:
        print("\ncalibration on topologies/small.yaml (measured on this host; load average "
              f"{', '.join(f'{x:.1f}' for x in c['load_average'])})")
        for r in report["codec"]:
            print(f"codec {r['bytes'] / 1e6:>6.2f} MB: encode {r['encode_s'] * 1e3:.2f} ms, "
                  f"decode {r['decode_s'] * 1e3:.2f} ms")
        print(f"{c['runs']} runs ({c['runs_left_out']} below {MIN_FIT_RATE_MBPS} Mbit/s left out)")
        print(f"single messages, t_down - tcp: {_quartiles(c['residual_down_ms'])}")
        print(f"single messages, t_up - tcp - device encode: {_quartiles(c['residual_up_ms'])}")
        print(f"per run, mean of those per message: {_quartiles(c['message_ms'])}")
        print(f"per run, server handling per stage beyond its codec: {_quartiles(c['handling_ms'])}")
        print(f"per run, padded t_cmp - profile time per stage: {_quartiles(c['pad_late_ms'])}")
        print(f"\nRELAY_CALIBRATION = RelayCalibration(  # in use: {RELAY_CALIBRATION}\n"
              f"    message_overhead_s={c['message_overhead_s']:.5f},\n"
              f"    encode_s_per_mb={c['encode_s_per_mb']:.5f},\n"
              f"    decode_s_per_mb={c['decode_s_per_mb']:.5f},\n"
              f"    relay_handling_s={c['relay_handling_s']:.5f},\n"
              f"    pad_late_s={c['pad_late_s']:.5f},\n)")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--skip", action="append", default=[], choices=["overhead", "small", "paper"])
    ap.add_argument("--seeds", default="1", help="paper.yaml placements to judge on, e.g. 2,3,4")
    ap.add_argument("--calibrate", action="store_true", help="fit RELAY_CALIBRATION on the overhead and small parts")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/relay.py needs root (namespaces, tc, cgroups)")
    if args.calibrate and {"overhead", "small"} & set(args.skip):
        sys.exit("--calibrate fits on the overhead and small parts: do not skip them")
    report: dict = {"overhead": [], "prediction": []}
    samples: list = []
    with tempfile.TemporaryDirectory(prefix="tb-bench-relay-") as tmp:
        out = Path(tmp)
        if "overhead" not in args.skip:
            report["overhead"] = await overhead(args.reps, out, samples)
        if "small" not in args.skip:
            report["prediction"].append(await prediction_and_memory("small", args.reps, out, memory=False,
                                                                    samples=samples))
        if args.calibrate:  # before paper.yaml runs: nothing of them reaches the fit
            report["codec"] = codec_times()
            report["calibration"] = fit_calibration(report["codec"], samples)
        if "paper" not in args.skip:
            for i, seed in enumerate(int(x) for x in args.seeds.split(",")):
                paper = await prediction_and_memory("paper", args.reps, out, memory=i == 0, seed=seed)
                report.setdefault("memory", paper.pop("memory", None))
                report["prediction"].append(paper)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)


if __name__ == "__main__":
    asyncio.run(main())
