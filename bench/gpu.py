"""Per-step GPU time of the tiny model and an SD1.5-sized UNet under CUDA MPS shares.

Each share (100, 50 and 25 %, and a reference without MPS) runs in its own worker process
with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE set before its first CUDA call, under the bench's
own MPS control daemon (started and stopped by testbed/emulation/gpu.py, the cell's code).
A worker times one UNet call — a denoising step with classifier-free guidance, batch 2 —
of each model at each precision: fp32, bf16 and int8, the project's own variants
(testbed/diffusion/quantize.py; bf16 is its fp16 variant computing in bfloat16). The call
is replayed from a CUDA graph so that the step is not bound by kernel launches (an SD1.5
UNet launches ~1000 kernels; eager, batch 1-2, it took 31-45 ms on an H200 whatever the
precision); at the first share the eager call is timed too, to show that overhead. Then
two workers at 50 % run side by side, released by one signal: as plain processes, and
(as root) dropped to two distinct node uids after their first CUDA call, the way the
agents would run (MPS serves one uid at a time: their contexts are made as root first).

It prints a table with the GPU's name, the ratios the issue asks for (50 % and 25 %
against 100 %: 2x and 4x within +-20 %; a pair at 50 % against one at 50 %: 1x) and the
FLOP rate each step reached; --out writes the same as JSON. Every time is measured.
Random weights (built on the GPU from SD1.5's config, nothing downloaded).

    python3 bench/gpu.py [--wheels .whl] [--out gpu.json]   # a GPU machine, as root
    .venv/bin/python bench/gpu.py --dry-run                 # CPU, tiny sizes, no MPS

--wheels DIR installs what is missing (diffusers) from wheels in DIR into a temporary
directory first; docs/gpu.md has the commands for a lent GPU machine. --budget-s bounds
the whole run: a scenario that would not fit is skipped and reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _p in (REPO, BENCH):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from gpu_worker import combo_key, step_flops  # noqa: E402 - bench/ is on the path just above

WORKER = BENCH / "gpu_worker.py"


@dataclass(frozen=True)
class Scenario:
    name: str
    shares: tuple[int | None, ...]  # one worker per entry; None: no MPS at all
    drop_uids: bool = False


def plan_scenarios(shares: list[int], baseline: bool, pair: bool, root: bool) -> list[Scenario]:
    out = [Scenario("no-mps", (None,))] if baseline else []
    out += [Scenario(f"share-{s}", (s,)) for s in shares]
    if pair:
        out.append(Scenario("pair-50", (50, 50)))
        if root:
            out.append(Scenario("pair-50-uids", (50, 50), drop_uids=True))
    return out


def plan_combos(models: list[str], precisions: list[str], batch: int, modes: list[str]) -> list[dict]:
    return [{"model": m, "precision": p, "mode": mode, "batch": batch}
            for m in models for p in precisions for mode in modes]


class WorkerFailed(RuntimeError):
    pass


class _Worker:
    """One worker process and a thread that queues its messages."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env,
                                         text=True, bufsize=1)
        self.messages: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.messages.put(json.loads(line))
        self.messages.put({"error": f"exited with code {self.proc.wait()}"})

    def expect(self, key: str, timeout_s: float):
        try:
            msg = self.messages.get(timeout=timeout_s)
        except queue.Empty:
            raise WorkerFailed(f"no '{key}' within {timeout_s:g} s") from None
        if key not in msg:
            tail = self.log.read_text(errors="replace")[-1500:]
            raise WorkerFailed(f"expected '{key}', got {json.dumps(msg)[:1500]}; stderr: {tail}")
        return msg[key]

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _free_node_uids(n: int) -> list[int]:
    from testbed.emulation.node_uids import RUN_UIDS, uids_in_use

    used = uids_in_use()
    return [u for u in reversed(RUN_UIDS) if u not in used][:n]


def run_scenario(sc: Scenario, wcfg: dict, env_for, logs: Path, setup_timeout_s: float,
                 step_timeout_s: float = 60.0, probe=lambda: None) -> tuple[list[dict], dict]:
    """Rows of every combination of every worker of `sc`, timed side by side; `probe()` is
    called once every worker is set up (its answer goes into the scenario's record)."""
    uids = _free_node_uids(len(sc.shares)) if sc.drop_uids else [None] * len(sc.shares)
    workers = []
    try:
        for i, (share, uid) in enumerate(zip(sc.shares, uids)):
            cfg = {**wcfg, "uid": uid}
            workers.append(_Worker([sys.executable, str(WORKER), json.dumps(cfg)],
                                   env_for(share), logs / f"{sc.name}-{i}.log"))
        setups = [w.expect("setup", setup_timeout_s) for w in workers]
        seen = probe()
        rows = []
        for c in wcfg["combos"]:
            for w in workers:
                if w.expect("ready", step_timeout_s) != combo_key(c):
                    raise WorkerFailed("workers out of step")
            for w in workers:
                w.go()
            for i, w in enumerate(workers):
                rows.append({"scenario": sc.name, "worker": i, "share_pct": sc.shares[i], "uid": setups[i]["uid"],
                             **w.expect("result", step_timeout_s)})
        for w in workers:
            w.expect("done", step_timeout_s)
        return rows, {"setup_s": [s["setup_s"] for s in setups], "gpu": setups[0]["gpu"],
                      "torch": setups[0]["torch"], "share_env": [s["share_env"] for s in setups],
                      "uids": [s["uid"] for s in setups], "probe": seen}
    finally:
        for w in workers:
            w.stop()


def mps_processes(pipe: Path) -> list[str]:
    """Names of the MPS processes on `pipe` while workers run: the control daemon, and a
    server once a client connected (a worker outside MPS makes none)."""
    from testbed.emulation.gpu import mps_pids

    names = []
    for pid in sorted(mps_pids(pipe)):
        with contextlib.suppress(OSError):
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
    return names


def add_ratios(rows: list[dict]) -> list[dict]:
    """Each row's step time against the same combination at 100 % (one worker) and, for a
    pair, against one worker at 50 %; checks as the issue states them."""
    def ref(scenario: str, r: dict) -> float | None:
        for o in rows:
            if o["scenario"] == scenario and combo_key(o) == combo_key(r) and o.get("step_s"):
                return o["step_s"]
        return None

    checks = []
    for r in rows:
        if not r.get("step_s"):
            continue
        if r["scenario"].startswith("share-") and (base := ref("share-100", r)):
            r["x_100"] = r["step_s"] / base
            r["expected_x_100"] = 100 / r["share_pct"]
        elif r["scenario"].startswith("pair-") and (base := ref("share-50", r)):
            r["x_one_at_50"] = r["step_s"] / base
            r["expected_x_one_at_50"] = 1.0
        if r["scenario"] == "share-100" and (base := ref("no-mps", r)):
            r["x_no_mps"] = r["step_s"] / base
        ratio, want = r.get("x_100") or r.get("x_one_at_50"), r.get("expected_x_100") or r.get("expected_x_one_at_50")
        if ratio and r["share_pct"] != 100:
            checks.append({"scenario": r["scenario"], "worker": r["worker"], "combo": combo_key(r),
                           "ratio": round(ratio, 3), "expected": want, "within_20pct": abs(ratio / want - 1) <= 0.2})
    return checks


def format_table(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"GPU: {m['gpu']} (driver {m['driver']}), torch {m['torch']}, diffusers {m['diffusers']}; "
             f"measured {m['date']}{' — DRY RUN on the CPU' if doc['dry_run'] else ''}",
             f"{'scenario':<13}{'w':>2}{'share':>6} {'model':<5} {'prec':<5}{'mode':<6}{'batch':>5}"
             f"{'ms/step':>10}{'TFLOP/s':>9}{'ratio':>7}{'want':>6}"]
    for r in doc["rows"]:
        share = "-" if r["share_pct"] is None else f"{r['share_pct']}%"
        head = f"{r['scenario']:<13}{r['worker']:>2}{share:>6} {r['model']:<5} {r['precision']:<5}{r['mode']:<6}{r['batch']:>5}"
        if r.get("error"):
            lines.append(f"{head}  error: {r['error'][:80]}")
            continue
        ratio = r.get("x_100") or r.get("x_one_at_50")
        want = r.get("expected_x_100") or r.get("expected_x_one_at_50")
        lines.append(f"{head}{r['step_s'] * 1e3:>10.3f}{r.get('tflop_s', 0):>9.1f}"
                     f"{'' if ratio is None else f'{ratio:.2f}':>7}{'' if want is None else f'{want:g}':>6}")
    if doc["checks"]:
        ok = sum(c["within_20pct"] for c in doc["checks"])
        lines.append(f"ratios within +-20 % of the expected: {ok} of {len(doc['checks'])}")
    for s in doc["skipped"]:
        lines.append(f"skipped: {s}")
    return "\n".join(lines)


def _ensure_diffusers(wheels: Path | None) -> Path | None:
    """diffusers importable: already, or installed from `wheels` into a temporary directory
    (returned: the workers need it on PYTHONPATH)."""
    try:
        import diffusers  # noqa: F401

        return None
    except ImportError:
        pass
    found = sorted(Path(wheels).glob("*.whl")) if wheels else []
    if not found:
        sys.exit("diffusers is not installed and --wheels names no wheels; see docs/gpu.md")
    site = Path(tempfile.mkdtemp(prefix="tb-gpu-site-"))
    site.chmod(0o755)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--target", str(site), *map(str, found)], check=True)
    sys.path.insert(0, str(site))
    return site


def _versions() -> dict:
    import diffusers
    import torch

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "python": sys.version.split()[0], "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32}


def _document(a: argparse.Namespace, info, rows: list[dict], runs: dict, skipped: list[str],
              flops: dict, wall_s: float, partial: bool) -> dict:
    for r in rows:
        if r.get("step_s") and flops.get(r["model"]):
            r["tflop_s"] = flops[r["model"]] / r["step_s"] / 1e12
    checks = add_ratios(rows)
    return {"kind": "measured", "what": "seconds per UNet call (one denoising step, CFG batch) under CUDA MPS shares",
            "dry_run": a.dry_run, "partial": partial,
            "machine": {"gpu": info.names[0] if info else "cpu (dry run)", "driver": info.driver if info else None,
                        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **_versions()},
            "settings": {"shares_pct": a.shares, "models": a.models, "precisions": a.precisions, "batch": a.batch,
                         "px": a.px, "window_s": a.window_s, "flops_per_step": flops},
            "scenarios": runs, "rows": rows, "checks": checks, "skipped": skipped, "wall_s": wall_s}


def _flops(a: argparse.Namespace) -> dict:
    out = {}
    for m in a.models:
        try:
            out[m] = step_flops(m, a.batch, a.px, a.dry_run)
        except Exception as e:  # noqa: BLE001 - a rate is a bonus; the times stand without it
            print(f"note: FLOPs of {m} not counted ({type(e).__name__}: {e})", file=sys.stderr)
    return out


def run(a: argparse.Namespace) -> dict:
    """Every scenario within the budget; with --out, the document is rewritten after each
    (a run cut short still leaves what it measured)."""
    from testbed.emulation.gpu import PIPE_ENV, SHARE_ENV, MpsDaemon, detect_gpu, mps_dirs, share_env

    started = time.monotonic()
    site = _ensure_diffusers(a.wheels)
    info = None if a.dry_run else detect_gpu()
    if info is not None and not info.present:
        sys.exit(f"no GPU here ({info.problem}); --dry-run checks the script on the CPU")
    if info is not None and info.mps_control is None:
        sys.exit("nvidia-cuda-mps-control is not on PATH: the shares cannot be applied")
    flops = _flops(a)  # on the meta device, before any worker: no GPU work
    scenarios = plan_scenarios(a.shares, a.baseline, a.pair, os.geteuid() == 0)
    wcfg = {"device": "cpu" if a.dry_run else "cuda", "dry_run": a.dry_run, "px": a.px, "window_s": a.window_s,
            "combos": []}
    tmp = Path(tempfile.mkdtemp(prefix="tb-gpu-bench-"))
    tmp.chmod(0o711)
    dirs = mps_dirs(tmp)
    daemon = None if info is None else MpsDaemon(info.mps_control, dirs)
    pythonpath = os.pathsep.join([str(p) for p in (site, REPO) if p] + [os.environ.get("PYTHONPATH", "")])

    def env_for(share: int | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in (PIPE_ENV, SHARE_ENV)}
        env["PYTHONPATH"], env["PYTHONUNBUFFERED"] = pythonpath, "1"
        if share is not None:
            env.update(share_env(share, dirs.pipe) if daemon else {SHARE_ENV: str(share)})
        return env

    rows: list[dict] = []
    runs: dict[str, dict] = {}
    skipped: list[str] = []
    longest_s = 0.0
    try:
        if daemon is not None:
            asyncio.run(daemon.start())
        for sc in scenarios:
            left_s = a.budget_s - (time.monotonic() - started)
            if left_s < longest_s * 1.2:
                skipped.append(f"{sc.name}: {left_s:.0f} s of --budget-s left, the longest scenario took {longest_s:.0f} s")
                continue
            t0 = time.monotonic()
            # a CPU has no graphs; on the GPU the eager call is timed at the first share only
            modes = ["eager"] if a.dry_run else ["graph", "eager"] if a.eager and sc.shares == (a.shares[0],) else ["graph"]
            wcfg["combos"] = plan_combos(a.models, a.precisions, a.batch, modes)
            try:
                got, runs[sc.name] = run_scenario(sc, wcfg, env_for, tmp, min(a.worker_timeout_s, max(left_s, 30)),
                                                  probe=lambda: mps_processes(dirs.pipe))
                rows += got
            except WorkerFailed as e:
                skipped.append(f"{sc.name}: a worker failed: {e}")
            longest_s = max(longest_s, time.monotonic() - t0)
            if a.out:
                _write(a.out, _document(a, info, rows, runs, skipped, flops, time.monotonic() - started, True))
    finally:
        if daemon is not None:
            asyncio.run(daemon.stop())
        shutil.rmtree(tmp, ignore_errors=True)
        if site is not None:
            shutil.rmtree(site, ignore_errors=True)
    return _document(a, info, rows, runs, skipped, flops, time.monotonic() - started, False)


def _write(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def _list(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no MPS: checks this script")
    p.add_argument("--shares", type=_list(int), default=[100, 50, 25], help="percentages; 100 is the reference of the ratios, eager calls are timed at the first")
    p.add_argument("--models", type=_list(str), default=["tiny", "sd15"])
    p.add_argument("--precisions", type=_list(str), default=["fp32", "bf16", "int8"])
    p.add_argument("--batch", type=int, default=2, help="UNet batch: 2 = one image with guidance")
    p.add_argument("--px", type=int, default=512, help="SD1.5 image size (latent = px / 8)")
    p.add_argument("--window-s", type=float, default=None, help="seconds each timing runs (1.5; dry run 0.05)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the run without MPS")
    p.add_argument("--no-pair", dest="pair", action="store_false", help="skip the two workers at 50 %%")
    p.add_argument("--no-eager", dest="eager", action="store_false", help="skip eager timings at the first share")
    p.add_argument("--budget-s", type=float, default=330.0, help="stop starting scenarios after this")
    p.add_argument("--worker-timeout-s", type=float, default=240.0)
    p.add_argument("--wheels", type=Path, default=None, help="wheels of missing packages (diffusers)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON document here")
    a = p.parse_args(argv)
    bad = [x for x in a.precisions if x not in ("fp32", "bf16", "fp16", "int8", "int4")]
    if bad or a.batch < 2 or a.batch % 2 or not a.shares or any(not 1 <= s <= 100 for s in a.shares) \
            or any(m not in ("tiny", "sd15") for m in a.models):
        p.error("--precisions from fp32,bf16,fp16,int8,int4; --batch even >= 2 (CFG); --shares in 1-100; "
                "--models from tiny,sd15")
    if a.window_s is None:
        a.window_s = 0.05 if a.dry_run else 1.5
    return a


def main(argv: list[str] | None = None) -> int:
    doc = run(a := parse(argv))
    print(format_table(doc))
    if a.out:
        _write(a.out, doc)
        print(f"wrote {a.out}")
    return 0 if doc["rows"] and not any(r.get("error") for r in doc["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())