"""Faults at random moments on the netns backend: does every run still complete, exactly once per step?

One emulated cell (topologies/small.yaml by default: the relay dev01 -> dev02, with dev03
able to absorb one failure) stays up; each trial is one full generation (`RunSession.run`) with
one fault injected at a random moment, uniform over the baseline relay latency, on the
device in flight at that moment (broker-restart: the broker). Before the faults, a few
fault-free runs give the baseline latency. Each trial is bounded (a hang counts as one).

Columns: trials; completed (every step [0, N) ran exactly once, image decoded); recovered
(the orchestrator resumed or reassigned from the checkpoint); lost / duplicated steps over
all trials; mean extra latency over the baseline (completed trials); failed (run errors,
with the first message below the table). Target: 100 % completion (a feasible device
remains after one fault in this topology), 0 lost, 0 duplicated.

    sudo .venv/bin/python bench/faults.py [--trials 20] [--kinds kill,link-flap] [--seed 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from testbed.composition.faults import DEFAULT_DURATION_S, FAULT_KINDS, parse_fault
from testbed.model.topology import load_topology

REPO = Path(__file__).resolve().parent.parent
TRIAL_TIMEOUT_S = 120.0


def _steps(doc: dict[str, Any]) -> tuple[int, int]:
    """(lost, duplicated) steps of a result: each of [0, total) must be covered exactly once."""
    count = [0] * doc["total_steps"]
    for s in doc["stages"]:
        for k in range(*s["steps"]):
            count[k] += 1
    return sum(1 for c in count if c == 0), sum(c - 1 for c in count if c > 1)


async def _trial(r: Any, spec: Any) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(TRIAL_TIMEOUT_S):
            doc = (await r.run(faults=[spec] if spec is not None else [])).to_json()
    except TimeoutError:
        return {"ok": False, "error": f"hung: no result within {TRIAL_TIMEOUT_S:g} s", "wall_s": time.monotonic() - t0}
    except Exception as e:  # noqa: BLE001 - every failure is a row in the table
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "wall_s": time.monotonic() - t0}
    lost, dup = _steps(doc)
    return {"ok": lost == 0 and dup == 0 and doc.get("ms_ssim") is not None, "latency_s": doc["latency_s"],
            "recovered": len(doc["recovered"]), "reasons": [x["reason"] for x in doc["recovered"]], "lost": lost,
            "dup": dup, "ms_ssim": doc.get("ms_ssim"), "faults": doc.get("faults", []),
            "wall_s": time.monotonic() - t0}


async def _heal(r: Any, settle_s: float) -> None:
    """Between trials: revive killed agents, wait for every agent online, let late
    uploads of the last trial drain (a new orchestrator would take them for its own)."""
    await asyncio.sleep(settle_s)
    for dev in r.cell.device_ids():
        if r.cell.nodes[dev].state == "killed":
            await r.revive(dev)
    await r.ensure_agents(r.cell.device_ids())


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from testbed.composition.session import RunSession

    topo = load_topology(args.topology).model_copy(update={"faults": []})
    rng = random.Random(args.seed)
    rows: dict[str, list[dict[str, Any]]] = {}
    t_start = time.monotonic()
    async with RunSession(topo, out_dir=args.out) as r:
        await r.ensure_agents(r.cell.device_ids())
        base = [await _trial(r, None) for _ in range(args.baseline)]
        ok_base = [b["latency_s"] for b in base if b["ok"]]
        if not ok_base:
            raise SystemExit(f"baseline runs failed: {base[0].get('error')}")
        horizon_s = statistics.median(ok_base)  # faults land anywhere in a typical relay
        rows["(none)"] = base
        for kind in args.kinds:
            rows[kind] = []
            for n in range(args.trials):
                at = rng.uniform(0.05, 0.95) * horizon_s
                spec = parse_fault(kind, at_s=round(at, 3))
                res = await _trial(r, spec)
                res["at_s"] = at
                rows[kind].append(res)
                if args.verbose:
                    print(f"{kind} #{n}: at {at:.2f} s -> {'ok' if res['ok'] else res['error']}"
                          f"{' recovered ' + ','.join(res.get('reasons', [])) if res.get('recovered') else ''}",
                          file=sys.stderr, flush=True)
                await _heal(r, args.settle)
    return {"topology": str(args.topology), "seed": args.seed, "trials": args.trials, "baseline_s": ok_base,
            "horizon_s": horizon_s, "wall_s": time.monotonic() - t_start, "rows": rows}


def table(result: dict[str, Any]) -> str:
    base = statistics.mean(result["baseline_s"])
    lines = ["| fault | trials | completed | recovered | lost steps | duplicated steps | mean extra latency s | "
             "failed |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    notes = []
    for kind, rs in result["rows"].items():
        done = [x for x in rs if x["ok"]]
        extra = statistics.mean(x["latency_s"] - base for x in done) if done else float("nan")
        failed = [x for x in rs if not x["ok"]]
        lines.append(f"| {kind} | {len(rs)} | {len(done)} ({100 * len(done) / len(rs):.0f} %) | "
                     f"{sum(1 for x in rs if x.get('recovered'))} | {sum(x.get('lost', 0) for x in rs)} | "
                     f"{sum(x.get('dup', 0) for x in rs)} | {extra:+.2f} | {len(failed)} |")
        if failed:
            notes.append(f"{kind}: {failed[0]['error'][:200]}")
    dur = ", ".join(f"{k} {v:g} s" for k, v in DEFAULT_DURATION_S.items() if v)
    lines.append("")
    lines.append(f"baseline latency {base:.2f} s (mean of {len(result['baseline_s'])}); faults at uniform random "
                 f"moments in [0.05, 0.95] x {result['horizon_s']:.2f} s; durations {dur}; rate-drop 0.01 Mbit/s and "
                 f"slow 0.05 cores for the rest of the run; wall time {result['wall_s']:.0f} s")
    return "\n".join(lines + [f"first failure, {n}" for n in notes])


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20, help="trials per fault kind (default 20)")
    ap.add_argument("--kinds", type=lambda s: s.split(","), default=list(FAULT_KINDS),
                    help=f"comma-separated fault kinds (default: {','.join(FAULT_KINDS)})")
    ap.add_argument("--topology", type=Path, default=REPO / "topologies" / "small.yaml")
    ap.add_argument("--baseline", type=int, default=3, help="fault-free runs for the baseline latency")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds between trials (late uploads drain)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random moments")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs' outputs (events, logs) here")
    ap.add_argument("--json", type=Path, default=None, help="write every trial as JSON here")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per trial on stderr")
    args = ap.parse_args(argv)
    bad = [k for k in args.kinds if k not in FAULT_KINDS]
    if bad or args.trials < 1:
        ap.error(f"unknown fault kinds {bad}; use {', '.join(FAULT_KINDS)}" if bad else "--trials must be >= 1")
    return args


if __name__ == "__main__":
    a = _parse()
    res = asyncio.run(main(a))
    if a.json is not None:
        a.json.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(table(res))
