"""Benchmark of the diffusion workload on this machine's CPU.

1. Stage runner overhead: a chain of stages (K steps each, scheduler state handed off) vs one
   uninterrupted diffusers loop over the same schedule, alternated in one run; prints the
   wall-time ratio (target <= 1.02) and checks that both give the same latent.
2. Per-step time and memory of each precision variant of the embedded models (batch 1 + CFG).
3. --sd15: the same for an SD1.5-sized UNet (random weights, built from its config), each
   precision in a fresh process (peak RSS), --sd15-steps steps at --sd15-px (default 1 at 256 px).
4. --quality: the tiny model's figures for docs/model-card.md: mean MS-SSIM against the fp32
   50-step reference per precision and per step count, and how often the digit and both colours
   are what the prompt asks for, as the judge reads them (testbed/diffusion/judge.py: typefaces
   and handwriting the model never saw), per digit and per colour, with 95 % Wilson intervals.
5. --grid PNG: the image grid of docs/figures (10 prompts x 4 precisions, 50 DDIM steps);
   --digit-grid PNG: digits x 4 seeds at 20 steps, white on black and coloured, with the judge's reading.
6. --quota 1,0.25 (root, cgroups): per-step time of the tiny model's variants (CFG batch 2, one
   thread) in a process under each CPU quota, as an agent computes under its node's quota.

Usage: .venv/bin/python bench/diffusion.py [--steps 50] [--k 5] [--reps 5] [--sd15] [--json]
       .venv/bin/python bench/diffusion.py --quality [--json]
       .venv/bin/python bench/diffusion.py --grid docs/figures/tiny_grid.png
       .venv/bin/python bench/diffusion.py --digit-grid docs/figures/tiny_digits.png
       sudo .venv/bin/python bench/diffusion.py --quota 1,0.25
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch


def plain_loop(model, latent, cond, n, kind, g):
    """diffusers' own loop, no stage runner: the baseline."""
    from testbed.diffusion import make_scheduler

    sched = make_scheduler(kind, n, model)
    kw = {key: torch.cat([cond[f"uncond_{key}"], cond[key]]) for key in model.cond_keys}
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
    cond, lat, g = encode_prompt(m, "a red 7 on a white background"), initial_latent(m, 0), m.default_guidance_scale
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


def bench_embedded_precisions(steps: int) -> list[dict]:
    import psutil

    from testbed.diffusion import EMBEDDED_MODELS, PRECISIONS, encode_prompt, initial_latent, load_model, run_stage

    rows = []
    for name in EMBEDDED_MODELS:
        for p in PRECISIONS:
            rss0 = psutil.Process().memory_info().rss
            m = load_model(name, p)
            cond, lat = encode_prompt(m, "a handwritten 3"), initial_latent(m, 1)
            run_stage(m, lat, cond, 0, 2, steps)  # warm-up
            t0, c0 = time.perf_counter(), time.process_time()
            run_stage(m, lat, cond, 0, steps, steps)
            rows.append({"model": name, "precision": p, "dtype": str(m.compute_dtype).removeprefix("torch."),
                         "size_bytes": m.size_bytes, "step_s": (time.perf_counter() - t0) / steps,
                         "step_cpu_s": (time.process_time() - c0) / steps,
                         "rss_delta_bytes": psutil.Process().memory_info().rss - rss0})
            del m
    return rows


GRID_PROMPTS = (
    "a handwritten 7", "a red 0 on a white background", "a yellow 1 on a blue background",
    "a green 2 on a black background", "a blue 3 on a yellow background", "a white 4 on a red background",
    "a black 5 on a green background", "a red 6 on a yellow background", "a blue 8 on a white background",
    "a yellow 9 on a green background",
)


def tiny_images(precision: str, prompts: list[str], seeds: list[int], steps: int, guidance: float | None = None):
    """(N, 32, 32, 3) uint8 images of the tiny model, prompt i with seed i, one batched run."""
    from testbed.diffusion import decode, encode_prompt, initial_latent, load_model, run_stage

    m = load_model("tiny", precision)
    conds = [encode_prompt(m, p) for p in prompts]
    cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    x, _ = run_stage(m, torch.cat([initial_latent(m, s) for s in seeds]), cond, 0, steps, steps,
                     guidance_scale=guidance)
    return decode(m, x)


def wilson(k: int, n: int) -> list[float]:
    """95 % Wilson interval of a proportion k / n."""
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return [round(ci.low, 3), round(ci.high, 3)]


def judged(precision: str, items: list[tuple[str, int]], steps: int, guidance: float | None = None) -> dict:
    """Generate each (prompt, seed) and let the judge read it: rates with 95 % intervals, per digit,
    per ink and per background colour, and each image's reading."""
    from testbed.diffusion.judge import judge_images, reads_as_prompted
    from testbed.model.prompts import COLOURS, parse_colour_prompt

    imgs = np.concatenate([tiny_images(precision, [p for p, _ in items[i:i + 60]], [s for _, s in items[i:i + 60]],
                                       steps, guidance) for i in range(0, len(items), 60)])
    readings = judge_images(imgs)
    ok = [reads_as_prompted(p, r) for (p, _), r in zip(items, readings)]
    want = [parse_colour_prompt(p) for p, _ in items]

    def rate(pick) -> dict:
        idx = [i for i, w in enumerate(want) if pick(w)]
        digit, colours = sum(ok[i][0] for i in idx), sum(ok[i][1] for i in idx)
        both = sum(ok[i][0] and ok[i][1] for i in idx)
        return {"n": len(idx), "digit": digit / len(idx), "digit_ci": wilson(digit, len(idx)),
                "colours": colours / len(idx), "colours_ci": wilson(colours, len(idx)), "both": both / len(idx),
                "confident_digit": sum(ok[i][0] and readings[i].confidence >= 0.5 for i in idx) / len(idx)}

    return {"all": rate(lambda w: True),
            "digit": {d: rate(lambda w, d=d: w.digit == d) for d in range(10)},
            "ink": {c: rate(lambda w, c=c: w.ink == c) for c in COLOURS if any(w.ink == c for w in want)},
            "background": {c: rate(lambda w, c=c: w.background == c) for c in COLOURS
                           if any(w.background == c for w in want)},
            "images": [{"prompt": p, "seed": s, "digit": r.digit, "confidence": round(r.confidence, 3),
                        "ink": r.ink, "background": r.background} for (p, s), r in zip(items, readings)],
            "_images": imgs}


def bench_quality(seeds: int, fidelity_seeds: int) -> dict:
    """MS-SSIM vs the reference per precision (50 steps) and per step count (fp32); prompt
    fidelity as the judge reads it (20 steps): per precision on 10 digits x `fidelity_seeds`
    white-on-black and as many coloured prompts, and at fp32 also on colour-less prompts."""
    from testbed.diffusion import PRECISIONS, ms_ssim, reference_image
    from testbed.diffusion.judge import fidelity_prompts

    prompts = ["a blue 4 on a yellow background", "a handwritten 7", "a red 0 on a white background"]
    doc: dict = {"seeds": seeds, "prompts": prompts, "precision": {}, "steps": {}, "fidelity": {}}
    refs = {p: [reference_image("tiny", p, s) for s in range(seeds)] for p in prompts}

    def mean_msssim(precision: str, steps: int) -> float:
        vals = [ms_ssim(im, ref) for p in prompts
                for im, ref in zip(tiny_images(precision, [p] * seeds, list(range(seeds)), steps), refs[p])]
        return float(np.mean(vals))

    for prec in PRECISIONS:
        doc["precision"][prec] = mean_msssim(prec, 50)
    for steps in (5, 10, 20):
        doc["steps"][steps] = mean_msssim("fp32", steps)
    doc["steps"][50] = doc["precision"]["fp32"]
    for prec in PRECISIONS:
        kinds = ("white", "coloured", "plain") if prec == "fp32" else ("white", "coloured")
        doc["fidelity"][prec] = {k: judged(prec, fidelity_prompts(k, fidelity_seeds), 20) for k in kinds}
        for k in kinds:
            doc["fidelity"][prec][k].pop("_images")
    return doc


def quota_one(procs_files: list[str], steps: int) -> list[dict]:
    """In a child process: join the cgroup, then time each variant's steps (wall and CPU)."""
    for f in procs_files:
        with open(f, "w") as fh:
            fh.write("0")  # cgroup v1/v2: "0" moves the writing process
    from testbed.diffusion import PRECISIONS, encode_prompt, initial_latent, load_model, run_stage

    rows = []
    for p in PRECISIONS:
        m = load_model("tiny", p)
        cond, lat = encode_prompt(m, "a red 7 on a white background"), initial_latent(m, 1)
        run_stage(m, lat, cond, 0, 2, steps)  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        run_stage(m, lat, cond, 0, steps, steps)
        rows.append({"precision": p, "step_s": (time.perf_counter() - t0) / steps,
                     "step_cpu_s": (time.process_time() - c0) / steps})
    return rows


def bench_quotas(quotas: list[float], steps: int, threads: int) -> list[dict]:
    """Each quota in its own cgroup (testbed/bq<pid>/q<i>), removed afterwards."""
    import os

    from testbed.emulation.cgroups import CgroupLimits, detect_cgroups

    cg, run = detect_cgroups(), f"bq{os.getpid() % 100000}"
    out = []
    try:
        for i, cores in enumerate(quotas):
            cg.create(run, f"q{i}", CgroupLimits(cores, None))
            files = [str(f) for f in cg.procs_files(run, f"q{i}")]
            r = subprocess.run([sys.executable, __file__, "--quota-one", ",".join(files), "--threads", str(threads),
                                "--steps", str(steps)], capture_output=True, text=True, timeout=1800, check=True)
            out += [{"cpu_quota": cores, **row} for row in json.loads(r.stdout.strip().splitlines()[-1])]
    finally:
        cg.remove(run)
    return out


def write_grid(path: str, seed: int = 0, scale: int = 4) -> None:
    """10 prompts (rows) x 4 precisions (columns), 50 DDIM steps, each image enlarged `scale` x."""
    from PIL import Image, ImageDraw, ImageFont

    from testbed.diffusion import PRECISIONS

    cols = {p: tiny_images(p, list(GRID_PROMPTS), [seed + i for i in range(len(GRID_PROMPTS))], 50)
            for p in PRECISIONS}
    cell, pad, left, top = 32 * scale, 8, 330, 34
    w = left + len(PRECISIONS) * (cell + pad)
    h = top + len(GRID_PROMPTS) * (cell + pad)
    canvas = Image.new("RGB", (w, h), (250, 250, 250))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=18)
    names = {"fp32": "fp32", "fp16": "bf16", "int8": "int8", "int4": "int4"}
    for j, p in enumerate(PRECISIONS):
        draw.text((left + j * (cell + pad) + cell // 2, top // 2), names[p], fill=(0, 0, 0), font=font, anchor="mm")
    for i, prompt in enumerate(GRID_PROMPTS):
        y = top + i * (cell + pad)
        draw.text((8, y + cell // 2), prompt, fill=(0, 0, 0), font=font, anchor="lm")
        for j, p in enumerate(PRECISIONS):
            tile = Image.fromarray(np.asarray(cols[p][i])).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (left + j * (cell + pad), y))
    canvas.save(path)


def write_digit_grid(path: str, seeds: int = 4, scale: int = 3) -> dict:
    """Digits (rows) x seeds (columns), fp32, 20 DDIM steps: 'a white D on a black background' on
    the left, the coloured prompts of the fidelity set on the right; under each image the digit
    the judge reads (red where it is not the one asked for, or a colour is wrong)."""
    from PIL import Image, ImageDraw, ImageFont

    from testbed.diffusion.judge import fidelity_prompts

    panels = {k: judged("fp32", fidelity_prompts(k, seeds), 20) for k in ("white", "coloured")}
    cell, pad, label, gap, top = 32 * scale, 6, 20, 40, 30
    w = 2 * seeds * (cell + pad) + gap
    h = top + 10 * (cell + label + pad)
    canvas = Image.new("RGB", (w, h), (250, 250, 250))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=14)
    for j, (kind, doc) in enumerate(panels.items()):
        x0 = j * (seeds * (cell + pad) + gap)
        title = "a white D on a black background" if kind == "white" else "a <ink> D on a <background> background"
        draw.text((x0 + seeds * (cell + pad) // 2, top // 2), title, fill=(0, 0, 0), font=font, anchor="mm")
        for i, (img, r) in enumerate(zip(doc["_images"], doc["images"])):
            d, s = divmod(i, seeds)
            x, y = x0 + s * (cell + pad), top + d * (cell + label + pad)
            canvas.paste(Image.fromarray(np.asarray(img)).resize((cell, cell), Image.NEAREST), (x, y))
            right = r["digit"] == d and f"a {r['ink']} {d} on a {r['background']} background" == r["prompt"]
            draw.text((x + cell // 2, y + cell + label // 2), f"reads {r['digit']} ({r['confidence']:.2f})",
                      fill=(0, 0, 0) if right else (200, 0, 0), font=font, anchor="mm")
    canvas.save(path)
    return {k: {key: v for key, v in doc.items() if key != "_images"} for k, doc in panels.items()}


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
    ap.add_argument("--quality", action="store_true", help="the tiny model's quality figures (model card)")
    ap.add_argument("--quality-seeds", type=int, default=10)
    ap.add_argument("--fidelity-seeds", type=int, default=10, help="seeds per digit of the judge's fidelity sets")
    ap.add_argument("--digit-grid", help="write digits x 4 seeds (white on black | coloured), as the judge reads "
                    "them, to this PNG")
    ap.add_argument("--grid", help="write the tiny model's image grid (10 prompts x 4 precisions) to this PNG")
    ap.add_argument("--quota", help="CPU quotas (cores, comma-separated) to time the tiny model's steps under")
    ap.add_argument("--quota-one", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.sd15_one:
        print(json.dumps(sd15_one(a.sd15_one, a.sd15_px, a.sd15_steps)))
        return
    if a.quota_one:
        print(json.dumps(quota_one(a.quota_one.split(","), a.steps)))
        return
    if a.quota:
        rows = bench_quotas([float(q) for q in a.quota.split(",")], min(a.steps, 20), a.threads)
        if a.json:
            print(json.dumps(rows, indent=2))
            return
        print(f"{'cpu quota':>9} {'prec':5} {'s/step':>8} {'cpu s/step':>10}   (tiny, CFG batch 2, {a.threads} thread)")
        for r in rows:
            print(f"{r['cpu_quota']:9.2f} {r['precision']:5} {r['step_s']:8.4f} {r['step_cpu_s']:10.4f}")
        return
    if a.grid:
        write_grid(a.grid)
        print(f"wrote {a.grid}")
        return
    if a.digit_grid:
        doc = write_digit_grid(a.digit_grid)
        print(f"wrote {a.digit_grid}: " + ", ".join(
            f"{k}: digit {d['all']['digit']:.0%}, colours {d['all']['colours']:.0%}" for k, d in doc.items()))
        return
    if a.quality:
        q = bench_quality(a.quality_seeds, a.fidelity_seeds)
        if a.json:
            print(json.dumps(q, indent=2))
            return
        print(f"tiny model, mean MS-SSIM vs fp32 50-step reference ({q['seeds']} seeds x {len(q['prompts'])} prompts)")
        print("precision (50 steps): " + "  ".join(f"{p} {v:.3f}" for p, v in q["precision"].items()))
        print("fp32 steps:           " + "  ".join(f"{k} {v:.3f}" for k, v in q["steps"].items()))
        print(f"prompt fidelity as the judge reads it (20 steps, 10 digits x {a.fidelity_seeds} seeds per set):")
        for p, kinds in q["fidelity"].items():
            for k, f in kinds.items():
                al = f["all"]
                print(f"  {p:5} {k:9} digit {al['digit']:.1%} {al['digit_ci']}  colours {al['colours']:.1%} "
                      f"{al['colours_ci']}  both {al['both']:.1%}  digit at p>=0.5 {al['confident_digit']:.1%}  "
                      "per digit " + " ".join(f"{d['digit']:.0%}" for d in f["digit"].values()))
        return
    doc = {"overhead": [bench_overhead(a.steps, a.k, a.reps, a.scheduler),
                        bench_overhead(a.steps, a.k, a.reps, "dpm")],
           "precisions": bench_embedded_precisions(20)}
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
    print(f"{'model':12} {'prec':5} {'dtype':9} {'size MB':>9} {'s/step':>8} {'cpu s/step':>10} {'mem MB':>8}")
    for r in doc["precisions"]:
        mem = r.get("peak_rss_bytes", r.get("rss_delta_bytes", 0))
        cpu = f"{r['step_cpu_s']:10.4f}" if "step_cpu_s" in r else f"{'':10}"
        print(f"{r['model']:12} {r['precision']:5} {r['dtype']:9} {r['size_bytes'] / 1e6:9.2f} "
              f"{r['step_s']:8.4f} {cpu} {mem / 1e6:8.1f}")
    print("mem: embedded models = RSS growth while loading and running the variant; "
          "sd15 = peak RSS of its own process")


if __name__ == "__main__":
    main()
