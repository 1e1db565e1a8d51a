"""Time of `testbed sweep FILE --quick` (the issue's target: under 10 minutes on 2 cores),
printed side by side with the target, plus the split of the time between emulation
bring-up and runs, how many runs met their budgets, and the claims' verdicts.

    .venv/bin/python bench/sweep_quick.py [topologies/paper.yaml] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 600.0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("file", nargs="?", default="topologies/paper.yaml")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = args.out or f"out/bench-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    testbed = Path(sys.executable).with_name("testbed")
    t0 = time.perf_counter()
    r = subprocess.run([str(testbed), "sweep", args.file, "--quick", "--out", out, "--json"],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-4000:])
        sys.exit(r.returncode)
    doc = json.loads(r.stdout)
    print(f"cores: {os.cpu_count()}  runs: {doc['runs']}  out: {doc['out_dir']}")
    print(f"{'measure':<28}{'seconds':>10}{'target':>10}{'ratio':>8}")
    print(f"{'sweep --quick (wall)':<28}{wall:>10.1f}{TARGET_S:>10.0f}{wall / TARGET_S:>8.2f}")
    print(f"{'  of which emulation up':<28}{doc['setup_s']:>10.1f}")
    print(f"{'  per run (mean)':<28}{(doc['elapsed_s'] - doc['setup_s']) / max(1, doc['runs']):>10.2f}")
    for key, b in doc["budgets"].items():
        ran = b["runs"] - b["infeasible"]
        print(f"{key}: {b['within_t_max']} of {ran} runs within T_max (measured), {b['infeasible']} infeasible")
    for c in doc["claims"]:
        print(f"claim {c['id']}: {c['verdict']} ({c['n_seeds']} seeds, effect {c['effect']}) — {c['statement']}")


if __name__ == "__main__":
    main()
