"""How `up`, selection, a run, memory and `down` grow with the number of devices, beside
Mininet's `up` of as many hosts, measured in one run (as root).

For each size N (default 20, 50, 100, 200) the dense cell (topologies/dense.yaml: the
paper's radio, workload and budgets in the same 500 x 500 m, N devices):

- up: `testbed up FILE --run ID` as a user types it, until it returns (the cell usable:
  namespaces, links, shaping, cgroups, broker); warm: until its worker serves and the
  agents it keeps warm are online (every device up to 32, none beyond: online.warm_set);
- select: `testbed select FILE --json` as a user types it (wall), and the DP's own solve time;
- run: `testbed run FILE --run ID` on that cell (wall, first stage, the generation's
  latency and energy against T_max and E_max): the agents of the plan's chain start now
  when the cell keeps none warm, up to 16 spares behind them;
- memory: the proportional set size (PSS, /proc/PID/smaps_rollup) of every process of the
  run — supervisor, worker, agent template, agents, broker, delayer —, sampled every
  0.5 s from `up` to the end of the run; the peak is printed;
- down: `testbed down --run ID`, then whether anything of the run is left (namespaces,
  links, cgroups, state, processes);
- Mininet: a star of N hosts on a LinuxBridge with TCLink bandwidths, no controller
  (bench/startup.py's script; Debian's `mininet` under /usr/bin/python3): network only.

Every number is measured on this machine, wall clock unless it says otherwise; the load
average before and after is printed (medians of `--repeat`). Acceptance (issue 28, at rest):
dense (200): up <= 2 x Mininet's 200-host up, select <= 1 s, the run within its budgets,
PSS <= 6 GB, down leaves nothing.

    sudo .venv/bin/python bench/scale.py [--sizes 20 50 100 200] [--repeat 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import TESTBED, mininet_once  # noqa: E402 - the same Mininet script and console script

DENSE = Path(__file__).resolve().parent.parent / "topologies" / "dense.yaml"


def topology_of(n: int, tmp: Path) -> Path:
    """dense.yaml with `n` devices (same area, radio, workload and budgets)."""
    text = DENSE.read_text().replace("  count: 200\n", f"  count: {n}\n").replace("name: dense\n", f"name: dense{n}\n")
    path = tmp / f"dense{n}.yaml"
    path.write_text(text)
    return path


def run_pids(run_id: str) -> set[int]:
    """Every process of the run: in its cgroups or namespaces, naming its state directory
    (worker, template, broker), running as its node uids (agents), and its supervisor."""
    from testbed.emulation.cgroups import detect_cgroups
    from testbed.emulation.node_uids import pids_running_as, read_uids
    from testbed.emulation.nsutil import list_netns, pids_in_netns
    from testbed.emulation.runs import RUN_ROOT, supervisor_pid

    pids: set[int] = set()
    try:
        pids |= set(detect_cgroups().pids(run_id))
    except Exception:  # noqa: BLE001 - no cgroups: the other ways find them
        pass
    pids |= pids_in_netns([Path("/run/netns") / n for n in list_netns(f"tb-{run_id}-")])
    pids |= pids_running_as(set(read_uids(RUN_ROOT / run_id).values()))
    needle = f"{RUN_ROOT / run_id}/".encode()
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if needle in Path(f"/proc/{p}/cmdline").read_bytes():
                    pids.add(int(p))
            except OSError:
                pass
    if (sup := supervisor_pid(run_id)) is not None:
        pids.add(sup)
    return pids


def pss_bytes(pids: set[int]) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError):
            pass
    return total


class PssSampler:
    """The run's total PSS every `every_s` in a thread; `peak` and the process count then."""

    def __init__(self, run_id: str, every_s: float = 0.5):
        self.run_id, self.every_s = run_id, every_s
        self.peak, self.procs = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            pids = run_pids(self.run_id)
            total = pss_bytes(pids)
            if total > self.peak:
                self.peak, self.procs = total, len(pids)
            self._stop.wait(self.every_s)

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def _tb(*args: str, timeout_s: float = 900) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    r = subprocess.run([*TESTBED, *args], capture_output=True, text=True, timeout=timeout_s)
    return r, time.time() - t0


def _wait_warm(run_id: str, timeout_s: float = 900) -> float:
    """Seconds until the worker serves and its warm agents are online (what `up --wait` waits for)."""
    from testbed.emulation.runs import read_state

    t0 = time.time()
    while time.time() - t0 < timeout_s:
        state, worker = read_state(run_id) or {}, read_state(run_id, "worker.json") or {}
        if worker.get("error") or str(state.get("worker") or "").startswith("failed"):
            raise SystemExit(f"run {run_id}: the worker failed: {worker.get('error') or state.get('worker')}")
        warm = set(state.get("warm") or [])
        online = sum(1 for n in state.get("nodes", []) if n.get("id") in warm and n.get("agent_online"))
        if state.get("worker") == "ready" and worker.get("warm_done") and online >= len(warm):
            return time.time() - t0
        time.sleep(0.05)
    raise SystemExit(f"run {run_id}: not warm within {timeout_s:g} s")


def once(n: int, tmp: Path) -> dict[str, Any]:
    from testbed.emulation.runs import cleanup_run, run_objects

    topo = topology_of(n, tmp)
    run_id = "s" + uuid.uuid4().hex[:5]
    row: dict[str, Any] = {"devices": n}
    try:
        with PssSampler(run_id) as pss:
            up, row["up_s"] = _tb("up", str(topo), "--run", run_id, "--json")
            if up.returncode != 0:
                raise SystemExit(f"testbed up ({n} devices) failed ({up.returncode}): {up.stderr[-800:]}")
            row["warm_s"] = _wait_warm(run_id)
            sel, row["select_s"] = _tb("select", str(topo), "--json")
            if sel.returncode != 0:
                raise SystemExit(f"testbed select failed: {sel.stderr[-500:]}")
            row["solve_ms"] = json.loads(sel.stdout).get("solve_ms")
            out = tmp / f"run{n}"
            t0 = time.time()
            run, row["run_s"] = _tb("run", str(topo), "--run", run_id, "--out", str(out), "--json")
            if run.returncode != 0:
                raise SystemExit(f"testbed run --run ({n} devices) failed ({run.returncode}): {run.stderr[-800:]}")
            doc = json.loads(run.stdout)
            events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines() if x.strip()]
            row["first_stage_s"] = min(e["ts"] for e in events if e["type"] in ("stage_started", "run_started")) - t0
            row |= {"latency_s": doc["latency_s"], "t_max_s": doc["t_max_s"], "energy_j": doc["energy_j"],
                    "e_max_j": doc["e_max_j"], "selected": len(doc["selected"]),
                    "agents": len(json.loads((Path("/run/testbed") / run_id / "worker.json").read_text())["agents"])}
            row["within_budgets"] = doc["latency_s"] <= doc["t_max_s"] and doc["energy_j"] <= doc["e_max_j"]
        row["pss_peak_bytes"], row["processes"] = pss.peak, pss.procs
        down, row["down_s"] = _tb("down", "--run", run_id)
        if down.returncode != 0:
            raise SystemExit(f"testbed down failed: {down.stderr[-500:]}")
        row["left"] = run_objects().get(run_id, []) + [f"process {p}" for p in run_pids(run_id)]
    finally:
        cleanup_run(run_id)
    return row


def bench(sizes: list[int], repeat: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="tb-bench-scale-"))
    res: dict[str, Any] = {"load_before": os.getloadavg(), "rows": []}
    for n in sizes:
        runs = [once(n, tmp) for _ in range(repeat)]
        row: dict[str, Any] = {"devices": n}
        for k in runs[0]:
            vals = [r[k] for r in runs]
            row[k] = statistics.median(vals) if all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in vals) else vals[-1]
        mn = [x for x in (mininet_once(n) for _ in range(repeat)) if x is not None]
        row["mininet_up_s"] = statistics.median(x["up_s"] for x in mn) if mn else None
        row["mininet_down_s"] = statistics.median(x["down_s"] for x in mn) if mn else None
        res["rows"].append(row)
    res["load_after"] = os.getloadavg()
    return res


def _num(v: float | None, fmt: str = ".2f") -> str:
    return "n/a" if v is None else format(v, fmt)


def print_table(res: dict[str, Any]) -> None:
    print(f"load average before {res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f}; all measured here "
          "(wall s unless named)")
    print(f"{'devices':>7} | {'up s':>6} {'Mininet':>7} {'ratio':>5} | {'warm s':>6} | {'select s':>8} "
          f"{'solve ms':>8} | {'run s':>6} {'1st st':>6} {'lat s':>5}/{'T_max':<5} {'ok':>3} {'agents':>6} | "
          f"{'PSS MB':>7} {'procs':>5} | {'down s':>6} {'Mininet':>7} left")
    for r in res["rows"]:
        mn = r.get("mininet_up_s")
        ok = "yes" if r["within_budgets"] else "NO"
        print(f"{r['devices']:>7} | {r['up_s']:6.2f} {_num(mn):>7} {_num(r['up_s'] / mn if mn else None):>5} | "
              f"{r['warm_s']:6.2f} | {r['select_s']:8.2f} {r['solve_ms'] or 0:8.1f} | {r['run_s']:6.2f} "
              f"{r['first_stage_s']:6.2f} {r['latency_s']:5.2f}/{r['t_max_s']:<5g} {ok:>3} {r['agents']:>6} | "
              f"{r['pss_peak_bytes'] / 2**20:7.0f} {r['processes']:>5} | {r['down_s']:6.2f} "
              f"{_num(r.get('mininet_down_s')):>7} {'nothing' if not r['left'] else r['left']}")
    print("up: until `testbed up` returns (cell usable); warm: then until the worker and its warm agents are ready; "
          "agents: started for the run (chain + spares, or the warm set); PSS: peak of the run's processes")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20, 50, 100, 200])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/scale.py needs root", file=sys.stderr)
        return 4
    res = bench(args.sizes, args.repeat)
    print(json.dumps(res, indent=2)) if args.json else print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
