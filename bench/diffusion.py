"""Benchmark of the diffusion workload on this machine's CPU.

1. Stage runner overhead: a chain of stages (K steps each, scheduler state handed off) vs one
   uninterrupted diffusers loop over the same schedule, alternated in one run; prints the
   wall-time ratio (target <= 1.02) and checks that both give the same latent.
2. Per-step time and memory of each precision variant of the tiny model (batch 1 + CFG).
3. --sd15: the same for an SD1.5-sized UNet (random weights, built from its config), each
   precision in a fresh process (peak RSS), --sd15-steps steps at --sd15-px (default 1 at 256 px).

Usage: .venv/bin/python bench/diffusion.py [--steps 50] [--k 5] [--reps 5] [--sd15] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def plain_loop(model, latent, cond, n, kind, g):
    """diffusers' own loop, no stage runner: the baseline."""
    from testbed.diffusion import make_scheduler

    sched = make_scheduler(kind, n, model)
    key = model.cond_keys[0]
    kw = {key: torch.cat([cond[f"uncond_{key}"], cond[key]])}
    x = latent * sched.init_noise_sigma
    with torch.inference_mode():
        for t in sched.timesteps:
            x_in = sched.scale_model_input(torch.cat([x, x]), t)
            u, c = model.unet(x_in.to(model.compute_dtype), t, **kw).sample.float().chunk(2)
            x = sched.step(u + g * (c - u), t, x).prev_sample
    return x


def chain(model, latent, cond, n, k, kind, g):
    from testbed.diffusion import run_stage

    x, state = latent, None
    for a in range(0, n, k):
        x, state = run_stage(model, x, cond, a, min(a + k, n), n, kind, state, guidance_scale=g)
    return x


def bench_overhead(steps: int, k: int, reps: int, kind: str) -> dict:
    from testbed.diffusion import encode_prompt, initial_latent, load_model

    m = load_model("tiny", "fp32")
    cond, lat, g = encode_prompt(m, "a handwritten 7"), initial_latent(m, 0), m.default_guidance_scale
    plain_loop(m, lat, cond, steps, kind, g)  # warm-up
    wall = {"plain": [], "chain": []}
    cpu = {"plain": [], "chain": []}
    for i in range(reps):  # adjacent pairs, order swapped every other pair: load changes hit both alike
        for which in (("plain", "chain") if i % 2 == 0 else ("chain", "plain")):
            t0, c0 = time.perf_counter(), time.process_time()
            if which == "plain":
                a = plain_loop(m, lat, cond, steps, kind, g)
            else:
                b = chain(m, lat, cond, steps, k, kind, g)
            wall[which].append(time.perf_counter() - t0)
            cpu[which].append(time.process_time() - c0)

    def pair_ratio(d):
        return statistics.median(c / p for c, p in zip(d["chain"], d["plain"]))

    return {"scheduler": kind, "steps": steps, "k": k, "reps": reps,
            "plain_s": statistics.median(wall["plain"]), "chain_s": statistics.median(wall["chain"]),
            "ratio": pair_ratio(wall), "cpu_ratio": pair_ratio(cpu),
            "max_abs_diff": float((a - b).abs().max())}


def bench_tiny_precisions(steps: int) -> list[dict]:
    import psutil

    from testbed.diffusion import PRECISIONS, encode_prompt, initial_latent, load_model, run_stage

    rows = []
    for p in PRECISIONS:
        rss0 = psutil.Process().memory_info().rss
        m = load_model("tiny", p)
        cond, lat = encode_prompt(m, "a handwritten 3"), initial_latent(m, 1)
        run_stage(m, lat, cond, 0, 2, steps)  # warm-up
        t0 = time.perf_counter()
        run_stage(m, lat, cond, 0, steps, steps)
        dt = (time.perf_counter() - t0) / steps
        rows.append({"model": "tiny", "precision": p, "dtype": str(m.compute_dtype).removeprefix("torch."),
                     "size_bytes": m.size_bytes, "step_s": dt,
                     "rss_delta_bytes": psutil.Process().memory_info().rss - rss0})
        del m
    return rows


def sd15_one(precision: str, px: int, steps: int) -> dict:
    """One SD1.5-sized variant in this process: build (random weights), quantize, time `steps` steps."""
    from diffusers import UNet2DConditionModel

    from testbed.diffusion.quantize import compute_dtype, make_variant, model_size_bytes
    from testbed.diffusion.split import SD15_UNET_CONFIG

    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    unet = unet.to_empty(device="cpu")
    with torch.no_grad():
        for prm in unet.parameters():
            prm.normal_(0.0, 0.02)
    unet = make_variant(unet, precision)
    build_s = time.perf_counter() - t0
    dt = compute_dtype(precision)
    side = px // 8
    x = torch.randn(2, 4, side, side).to(dt)
    ehs = torch.randn(2, 77, 768).to(dt)
    times = []
    with torch.inference_mode():
        for _ in range(steps):
            t1 = time.perf_counter()
            unet(x, torch.tensor(500), encoder_hidden_states=ehs)
            times.append(time.perf_counter() - t1)
    return {"model": "sd15-random", "precision": precision, "dtype": str(dt).removeprefix("torch."),
            "size_bytes": model_size_bytes(unet), "step_s": min(times), "px": px, "batch": 2,
            "build_s": build_s, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sd15", action="store_true", help="also time an SD1.5-sized UNet (slow: minutes)")
    ap.add_argument("--sd15-px", type=int, default=256)
    ap.add_argument("--sd15-steps", type=int, default=1)
    ap.add_argument("--sd15-one", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.sd15_one:
        print(json.dumps(sd15_one(a.sd15_one, a.sd15_px, a.sd15_steps)))
        return
    doc = {"overhead": [bench_overhead(a.steps, a.k, a.reps, a.scheduler),
                        bench_overhead(a.steps, a.k, a.reps, "dpm")],
           "precisions": bench_tiny_precisions(20)}
    if a.sd15:
        for p in ("fp32", "fp16", "int8", "int4"):
            r = subprocess.run([sys.executable, __file__, "--sd15-one", p, "--sd15-px", str(a.sd15_px),
                                "--sd15-steps", str(a.sd15_steps), "--threads", str(a.threads)],
                               capture_output=True, text=True, timeout=1800, check=True)
            doc["precisions"].append(json.loads(r.stdout.strip().splitlines()[-1]))
    if a.json:
        print(json.dumps(doc, indent=2))
        return
    for o in doc["overhead"]:
        print(f"stage chain vs uninterrupted loop ({o['scheduler']}, {o['steps']} steps, K={o['k']}, "
              f"median of {o['reps']}): plain {o['plain_s']:.3f} s, chain {o['chain_s']:.3f} s, "
              f"wall ratio {o['ratio']:.3f} (target <= 1.02), CPU-time ratio {o['cpu_ratio']:.3f} "
              f"(medians of adjacent pairs), "
              f"max |diff| {o['max_abs_diff']:.1e}")
    print(f"{'model':12} {'prec':5} {'dtype':9} {'size MB':>9} {'s/step':>8} {'mem MB':>8}")
    for r in doc["precisions"]:
        mem = r.get("peak_rss_bytes", r.get("rss_delta_bytes", 0))
        print(f"{r['model']:12} {r['precision']:5} {r['dtype']:9} {r['size_bytes'] / 1e6:9.2f} "
              f"{r['step_s']:8.4f} {mem / 1e6:8.1f}")
    print("mem: tiny = RSS growth while loading and running the variant; sd15 = peak RSS of its own process")


if __name__ == "__main__":
    main()
