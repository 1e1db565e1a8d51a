"""`testbed generate` (one local generation, no emulation) and `testbed train-tiny` (the embedded models)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import typer

from testbed.cli.console import out, print_json
from testbed.errors import InputError, WorkloadError


def generate(
    out_path: Path = typer.Option(..., "--out", help="PNG file to write (the image alone)"),
    model: str = typer.Option("tiny", "--model", help="'tiny' (embedded, coloured digits), 'digits' (embedded, "
                              "8x8 grey digits), 'sd15' (HF cache, offline) or a diffusers model directory"),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16 (bf16 on CPU), int8 or int4"),
    steps: int = typer.Option(0, "--steps", help="denoising steps (0 = the model's reference steps)"),
    prompt: str = typer.Option("a handwritten 7", "--prompt",
                               help="text; tiny reads 'a <colour> <digit> on a <colour> background', digits one digit"),
    seed: int = typer.Option(0, "--seed", help="seed of the initial latent"),
    scheduler: str = typer.Option("ddim", "--scheduler", help="ddim, euler, dpm or pndm"),
    guidance: float = typer.Option(-1.0, "--guidance", help="classifier-free guidance scale (<0 = model default)"),
    upscale: int = typer.Option(1, "--upscale", help="integer nearest-neighbour enlargement of the PNG"),
    as_json: bool = typer.Option(False, "--json", help="print only a JSON document on stdout"),
) -> None:
    """Generate one image locally (no emulation): for sanity checks and reference images."""
    from PIL import Image

    from testbed.diffusion import generate as _generate
    from testbed.diffusion import load_model

    if upscale < 1:
        raise WorkloadError(f"--upscale {upscale}: must be >= 1")
    if steps < 0:
        raise WorkloadError(f"--steps {steps}: must be >= 1 (or 0 for the model's reference steps)")
    t0 = time.perf_counter()
    m = load_model(model, precision)
    n = steps or m.reference_steps
    t1 = time.perf_counter()
    img = _generate(m, prompt, seed, n, scheduler, None if guidance < 0 else guidance)
    t2 = time.perf_counter()
    pil = Image.fromarray(img)
    if upscale > 1:
        pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.NEAREST)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        pil.save(out_path, format="PNG")
    except OSError as e:
        raise WorkloadError(f"--out {out_path}: cannot write the image: {e}") from e
    doc = {"out": str(out_path), "model": m.name, "precision": m.precision, "size_bytes": m.size_bytes,
           "steps": n, "scheduler": scheduler, "prompt": prompt, "seed": seed, "width_px": pil.width,
           "height_px": pil.height, "load_s": round(t1 - t0, 3), "generate_s": round(t2 - t1, 3)}
    if as_json:
        print_json(doc)
        return
    out.print(f"wrote {out_path} ({pil.width}x{pil.height}): {m.name} {m.precision} "
              f"({m.size_bytes / 1e6:.2f} MB), {n} {scheduler} steps in {t2 - t1:.2f} s, seed {seed}")


def train_tiny(
    model: str = typer.Option("tiny", "--model", help="which embedded model: 'tiny' (coloured digits from a prompt), "
                              "'digits' (8x8 grey digits, scikit-learn's data set) or 'judge' (the digit classifier "
                              "that reads tiny's images; other typefaces and handwriting)"),
    out_path: Path = typer.Option(None, "--out", help="weights file (default: the embedded one in testbed/data/)"),
    steps: int = typer.Option(0, "--steps", help="optimizer steps (0 = the model's default: tiny 3750, digits 1200, judge 2000)"),
    batch: int = typer.Option(0, "--batch", help="batch size (0 = the model's default: tiny 64, digits 96, judge 128)"),
    seed: int = typer.Option(0, "--seed", help="seed (with --threads, fixes the result)"),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads; the result depends on it "
                                "(0 = the model's default: tiny 2, digits 1, judge 2)"),
    as_json: bool = typer.Option(False, "--json", help="print only a JSON document on stdout"),
) -> None:
    """Train an embedded model on data made on the spot (deterministic, CPU, minutes) into testbed/data/."""
    if "torch" not in sys.modules:  # read once, when torch loads OpenMP; the results do not depend on it
        # On cores busy with other work, waiting OpenMP threads sleep: at load 15 on 2 cores spinning
        # ones burnt 4x the CPU time for the same (bit-identical) steps. On idle cores they spin:
        # sleeping cost 25 % of the two-thread step time, OpenMP's default about 10 % (all measured).
        busy = os.getloadavg()[0] > (os.cpu_count() or 1) + 1
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE" if busy else "ACTIVE")
    from testbed.diffusion import train_digits, train_tiny
    from testbed.diffusion.judge import train_judge

    trainers = {"tiny": train_tiny, "digits": train_digits, "judge": train_judge}
    if model not in trainers:
        raise InputError(f"--model {model!r}: the embedded models are {', '.join(trainers)}")
    if steps < 0 or batch < 0 or threads < 0:
        raise InputError("--steps, --batch and --threads must be >= 1 (or 0 for the model's default)")
    given = {"steps": steps, "batch": batch, "threads": threads}
    kwargs = {k: v for k, v in given.items() if v} | ({"out": out_path} if out_path else {})
    summary = trainers[model](seed=seed, log=None if as_json else out.print, **kwargs)
    if as_json:
        print_json(summary)
        return
    out.print(f"wrote {summary['path']}: {summary['params']} parameters, loss {summary['loss']:.4f}, "
              f"{summary['seconds']:.0f} s ({summary['cpu_seconds']:.0f} s of CPU time)")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    app.command("train-tiny")(train_tiny)
