"""The `meta` block of a run's result: what a reader needs to trust the numbers.

Model and precisions actually computed in (fp16 runs as bfloat16 on a CPU), compute mode,
which path applied link delay and loss (netem, nfqueue+iptables or none), seeds, payload sizes, versions and the project's
git commit. Part of the composition layer (runner.py).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["run_meta", "git_commit", "versions"]

_REPO = Path(__file__).resolve().parents[2]


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        d = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() + ("-dirty" if d.stdout.strip() else "")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions(broker_kind: str | None = None) -> dict[str, Any]:
    v: dict[str, Any] = {"python": platform.python_version(), "kernel": platform.release()}
    for dist in ("testbed", "torch", "diffusers", "aiomqtt", "safetensors", "pyroute2"):
        v[dist] = _version(dist)
    if broker_kind == "mosquitto" and shutil.which("mosquitto"):
        try:
            out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=5).stdout
            v["mosquitto"] = out.splitlines()[0].split()[-1] if out else None
        except (OSError, subprocess.TimeoutExpired, IndexError):
            v["mosquitto"] = None
    elif broker_kind == "amqtt":
        v["amqtt"] = _version("amqtt")
    return v


def run_meta(topo: Any, emu: Any, broker: Any, outcome: Any, model: Any, image: dict[str, Any]) -> dict[str, Any]:
    wl = topo.workload
    precisions = {}
    for s in outcome.stages:
        precisions[s.device] = {"requested": s.precision, "computed_in": s.compute_dtype}
    return {
        "topology": topo.name,
        "model": wl.model,
        "model_size_bytes_fp32": getattr(model, "size_bytes", None),
        "precisions": precisions,
        "note": "fp16 variants compute in bfloat16 on a CPU; int8/int4 are weight-quantized variants of the local model",
        "compute": wl.compute,
        "profile_times": "SD1.5 step times of data/profiles.yaml" if wl.compute == "profile" else None,
        "overrun_stages": sum(1 for s in outcome.stages if s.overrun_s > 0),
        "scheduler": wl.scheduler,
        "steps_per_stage": wl.steps_per_stage,
        "total_steps": outcome.total_steps,
        "reference_steps": wl.reference_steps,
        "resolution_px": wl.resolution_px,
        "prompt": wl.prompt,
        "seed": topo.seed,
        "payload_bytes": wl.payload_bytes,
        "latent_bytes": int(outcome.latent.nbytes) if hasattr(outcome.latent, "nbytes") else None,
        "wire_bytes": sorted({s.wire_bytes_down for s in outcome.stages} | {s.wire_bytes_up for s in outcome.stages}),
        "image_shape": image.get("image_shape"),
        "backend": getattr(getattr(emu, "backend", None), "name", None),
        "netem": bool(getattr(emu, "netem", False)),
        "delay_path": (getattr(emu, "impair", None).status()["path"] if getattr(emu, "impair", None) is not None
                       else "none"),  # netem | nfqueue+iptables | none (docs/links.md)
        "shaping": "htb",
        "warnings": list(getattr(emu, "warnings", [])),
        "broker": getattr(broker, "kind", None),
        "timing": "wall clock (time.time) of one kernel: t_down = agent receive - server publish, "
                  "t_cmp = agent send - agent receive, t_up = server receive - agent send",
        "energy": "profile compute power x t_cmp + radio rx power x t_down + radio tx power x t_up",
        "rejected_results": outcome.rejected_results,
        "versions": versions(getattr(broker, "kind", None)),
        "git_commit": git_commit(),
    }
