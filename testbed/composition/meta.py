"""The `meta` block of a run's result: what a reader needs to trust the numbers.

Model and precisions actually computed in (fp16 runs as bfloat16 on a CPU), compute mode,
whether a delay path (netem) was active, seeds, payload sizes, versions and the project's
git commit. Part of the composition layer (session.py).
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


def run_meta(topo: Any, cell: Any, outcome: Any, model: Any, image: dict[str, Any]) -> dict[str, Any]:
    """What a reader needs to trust a run's numbers (see the module docstring)."""
    wl = topo.workload
    stages = outcome.stages
    precisions = {s["device"]: {"requested": s.get("precision"), "computed_in": s.get("compute_dtype")}
                  for s in stages if s.get("precision")}
    broker = cell.broker
    status = cell.status()
    return {
        "topology": topo.name,
        "model": wl.model,
        "model_size_bytes_fp32": getattr(model, "size_bytes", None),
        "precisions": precisions,
        "note": "fp16 variants compute in bfloat16 on a CPU; int8/int4 are weight-quantized variants of the local model",
        "compute": wl.compute,
        "profile_times": "SD1.5 step times of data/profiles.yaml" if wl.compute == "profile" else None,
        "overrun_stages": sum(1 for s in stages if (s.get("overrun_s") or 0) > 0),
        "scheduler": wl.scheduler,
        "steps_per_stage": wl.steps_per_stage,
        "total_steps": outcome.total_steps,
        "reference_steps": wl.reference_steps,
        "resolution_px": wl.resolution_px,
        "prompt": wl.prompt,
        "seed": topo.seed,
        "payload_bytes": wl.payload_bytes,
        "latent_bytes": int(outcome.latent.nbytes) if hasattr(outcome.latent, "nbytes") else None,
        "wire_bytes": sorted({s["bytes_down"] for s in stages if "bytes_down" in s}
                             | {s["bytes_up"] for s in stages if "bytes_up" in s}),
        "rejected_results": outcome.rejected_results,
        "image_shape": image.get("image_shape"),
        "backend": cell.backend_name,
        "netem": bool(status.get("netem")),
        "delay_path": "netem" if status.get("netem") else "none (no added propagation delay)",
        "shaping": "htb",
        "warnings": list(cell.warnings),
        "broker": getattr(broker, "kind", None),
        "timing": "wall clock (time.time) of one kernel: t_down = agent receive - server publish, "
                  "t_cmp = agent send - agent receive, t_up = server receive - agent send",
        "energy": "profile compute power x t_cmp + radio rx power x t_down + radio tx power x t_up",
        "versions": versions(getattr(broker, "kind", None)),
        "git_commit": git_commit(),
    }
