"""Patch parallelism on this machine's CPU, in one process (no network): what a band costs
and what displaced context does to the image.

1. Compute: one UNet call (CFG batch 2) of the unbroken model and of one band for N = 2, 4,
   on the model's latent and (--px) on larger ones, where the work outweighs Python's per-layer cost
   (the band's input, its halo and the other bands' context given): CPU seconds per call on
   one thread, and the ratio to the unbroken call (what `cmp_real_s` per device becomes).
2. Quality: MS-SSIM against the fp32 reference (50 steps, the run owner's), for the unbroken
   run, the synchronous patch run (must equal it) and displaced runs after W warm-up steps;
   the seam score: mean |difference| between image rows on either side of a band boundary
   over the same in the unbroken image (1 = no visible seam).
3. SD1.5 (meta device, --sd15): each band's context bytes and FLOP share beside the constants
   of methods/patch/plan.py.
4. --crossover FILE (modelled): the step counts the three plans fit on that cell as its radio
   bandwidth grows from 20 to 400 MHz.

Usage: .venv/bin/python bench/patch.py [--model tiny] [--px 32] [--steps 10,20] [--warmup 1,2,4] [--reps 5] [--sd15]
                                      [--crossover topologies/paper.yaml]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def band_call_seconds(model, n: int, reps: int, px: int | None = None) -> float:
    """Median CPU seconds (this thread's: robust to other jobs on the host) of one band's UNet
    call (band 0; displaced, so no waiting)."""
    from testbed.diffusion.patch import DisplacedExchange, PatchLayout, PatchUNet, run_synchronously
    from testbed.diffusion.stages import unet_conditioning

    cond = unet_conditioning(_cond(model), 1, True)
    c, h, _ = model.latent_shape
    x = torch.randn(2, c, px or h, px or h)  # the model's convolutions and attention take any size
    t = torch.tensor(500)
    if n == 1:
        fn = lambda: model.unet(x, t, **cond)  # noqa: E731
    else:
        punet = PatchUNet(model.unet)
        layout = PatchLayout(x.shape[-2], n)
        _, stale = run_synchronously(punet, x, t, cond, layout)
        xb = layout.extend(x, 0, punet.input_halo)
        fn = lambda: punet.forward(xb, t, cond, 0, layout, DisplacedExchange(0, stale))  # noqa: E731
    times = []
    with torch.inference_mode():
        fn()
        for _ in range(reps):
            t0 = time.thread_time()
            fn()
            times.append(time.thread_time() - t0)
    return statistics.median(times)


def _cond(model):
    from testbed.diffusion.models import encode_prompt

    return encode_prompt(model, "a handwritten 7")


def seam_score(img: np.ndarray, ref: np.ndarray, n: int) -> float:
    """|row jump| at the band boundaries of `img`, over the same jumps in `ref`."""
    h = img.shape[0]
    rows = [h * i // n for i in range(1, n)]
    jump = lambda a: np.mean([np.abs(a[r].astype(float) - a[r - 1].astype(float)).mean() for r in rows])  # noqa: E731
    base = jump(ref)
    return float(jump(img) / base) if base > 0 else float("nan")


def quality(model_name: str, steps_list: list[int], warmups: list[int], seed: int = 1) -> None:
    from testbed.diffusion import decode, initial_latent, load_model, run_stage
    from testbed.diffusion.patch import run_patch
    from testbed.diffusion.quality import ms_ssim, reference_image

    model = load_model(model_name, "fp32")
    prompt = "a handwritten 7"
    ref = reference_image(model_name, prompt, seed)
    lat, cond = initial_latent(model, seed), _cond(model)
    print(f"\nquality: {model_name}, seed {seed}, MS-SSIM vs the 50-step fp32 reference (measured)")
    print(f"{'steps':>5} {'run':<22} {'MS-SSIM':>8} {'max|dlatent|':>13} {'seams':>6}")
    for steps in steps_list:
        unbroken, _ = run_stage(model, lat, cond, 0, steps, steps, "ddim")
        img_u = decode(model, unbroken)
        print(f"{steps:>5} {'unbroken':<22} {ms_ssim(img_u, ref):>8.3f} {0:>13.2e} {1:>6.2f}")
        for n in (2, 4):
            for w in [steps, *warmups]:
                x, _ = run_patch(model, lat, cond, steps, n, warmup_steps=w)
                img = decode(model, x)
                what = f"N={n} sync" if w >= steps else f"N={n} displaced W={w}"
                print(f"{steps:>5} {what:<22} {ms_ssim(img, ref):>8.3f} {float((x - unbroken).abs().max()):>13.2e} "
                      f"{seam_score(img, img_u, n):>6.2f}")


def sd15() -> None:
    from testbed.diffusion.patch import sd15_patch_profile
    from testbed.methods.patch.plan import CONTEXT_BYTES_FP32, FLOP_SHARE

    print("\nSD1.5 on the meta device (counted) vs methods/patch/plan.py (constants)")
    print(f"{'px':>4} {'N':>2} {'band':>4} {'up MB':>7} {'const':>7} {'down MB':>8} {'const':>7} {'FLOP share':>10} "
          f"{'const':>6}")
    for px in (256, 512):
        for n in (2, 4):
            p = sd15_patch_profile(px, n)
            c = CONTEXT_BYTES_FP32[px][n]
            for i in range(n):
                print(f"{px:>4} {n:>2} {i:>4} {p['up_bytes'][i] / 1e6:>7.2f} {c['up'][i] / 1e6:>7.2f} "
                      f"{p['down_bytes'][i] / 1e6:>8.2f} {c['down'][i] / 1e6:>7.2f} {p['flop_share'][i]:>10.4f} "
                      f"{FLOP_SHARE[px][n]:>6.4f}")


def crossover(topology: str, t_values: list[float], e_max_j: float = 200.0) -> None:
    """Modelled: the steps each method's plan fits as the cell's bandwidth grows (the radio
    model's rates scale with it), to see where spatial collaboration overtakes temporal."""
    from testbed.methods.patch.strategy import model_bands
    from testbed.methods.split.sizes import feature_bytes_fn
    from testbed.errors import InfeasibleError
    from testbed.model.radio import compute_links
    from testbed.model.topology import load_topology, place
    from testbed.selection import device_costs, select
    from testbed.methods.patch.plan import plan_patch
    from testbed.methods.split.plan import plan_split

    base = load_topology(topology)
    _, points = model_bands(base.workload.model, base.workload.resolution_px)
    print(f"\ncrossover (modelled, the plans' predictions): {base.name}, E_max {e_max_j:g} J, steps that fit")
    print(f"{'MHz':>5} {'best up/down Mbit/s':>20} {'T_max':>6} {'multistage':>10} {'split':>6} {'patch':>6} {'N':>2}")
    for mhz in (20, 50, 100, 200, 400):
        topo = base.model_copy(update={"radio": base.radio.model_copy(update={"bandwidth_mhz": float(mhz)})})
        links = compute_links(topo, place(topo))
        best = max(links, key=lambda lk: lk.rate_up_mbps)
        for t in t_values:
            def steps(fn):
                try:
                    return fn()
                except InfeasibleError:
                    return 0, None
            ms = steps(lambda: (len(select(device_costs(topo, links), t, e_max_j).selected)
                                * topo.workload.steps_per_stage, None))[0]
            sp = steps(lambda: (plan_split(topo, links, t, e_max_j, feature_bytes_fn(256)).steps, None))[0]
            pp, n = steps(lambda: (lambda p: (p.steps, p.n))(plan_patch(topo, links, t, e_max_j, sync_points=points)))
            print(f"{mhz:>5} {best.rate_up_mbps:>9.0f}/{best.rate_down_mbps:<10.0f} {t:>6g} {ms:>10} {sp:>6} {pp:>6} "
                  f"{n or '-':>2}")


def main() -> None:
    from testbed.diffusion import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", default="10,20")
    ap.add_argument("--warmup", default="1,2,4")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--px", default="32", help="also time the model on these latent sizes (compute-bound bands)")
    ap.add_argument("--sd15", action="store_true")
    ap.add_argument("--crossover", default="", help="a topology: the plans' step counts as the bandwidth grows")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model, "fp32")
    for px in (None, *(int(p) for p in args.px.split(",") if p)):
        size = px or model.latent_shape[1]
        print(f"compute: {args.model} on a {size}x{size} latent, one UNet call (CFG batch 2), 1 thread, "
              f"median CPU s of {args.reps} (measured)")
        print(f"{'N':>2} {'band CPU s':>10} {'x unbroken':>10}")
        base = band_call_seconds(model, 1, args.reps, px)
        print(f"{1:>2} {base:>10.4f} {1:>10.2f}")
        for n in (2, 4):
            s = band_call_seconds(model, n, args.reps, px)
            print(f"{n:>2} {s:>10.4f} {s / base:>10.2f}")
    quality(args.model, [int(s) for s in args.steps.split(",")], [int(w) for w in args.warmup.split(",")])
    if args.sd15:
        sd15()
    if args.crossover:
        crossover(args.crossover, [2.0, 4.0, 8.0])


if __name__ == "__main__":
    main()
