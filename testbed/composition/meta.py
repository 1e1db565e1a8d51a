"""The `meta` block of a run's result: what a reader needs to trust the numbers.

Model and precisions actually computed in (fp16 runs as bfloat16 on a CPU), compute mode,
which path applied link delay and loss (netem, nfqueue+iptables or none), seeds, payload
sizes, versions, the project's git commit, and `labels`: what each number of the result is — measured on this machine,
emulated (a profile's time the run waited out) or modelled (a formula). Part of the
composition layer (session.py); the sweep's CSV, figures and the TUI take the same labels.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["EMULATED", "KINDS", "MEASURED", "MODELLED", "number_labels", "run_meta", "image_size", "git_commit",
           "versions"]

_REPO = Path(__file__).resolve().parents[2]

MEASURED, EMULATED, MODELLED = "measured", "emulated", "modelled"
#: What each kind of number means.
KINDS = {
    MEASURED: "measured on this machine (wall clock of the emulated run, or computed from its image)",
    EMULATED: "emulated: a device profile's time that the run waited out (compute: profile)",
    MODELLED: "modelled: a formula over profiles and link rates, not a measurement",
}


def number_labels(compute: str) -> dict[str, dict[str, str]]:
    """{field: {"kind", "how"}} for the numbers of a result document (and its stages)."""
    if compute == "profile":
        t_cmp = (EMULATED, "the profile's SD1.5 time for the stage's steps: the device waits out the rest of it "
                           "after the local model's real work (cmp_real_s); longer work shows as overrun_s")
    else:
        t_cmp = (MEASURED, "the local model's compute on this CPU, receipt to result")
    labels = {
        "latency_s": (MEASURED, "wall clock from the first task's publish to the last result's receipt"),
        "t_down_s": (MEASURED, "agent receive - server publish, over the shaped link"),
        "t_up_s": (MEASURED, "server receive - agent send, over the shaped link"),
        "t_tran_s": (MEASURED, "sum of t_down_s + t_up_s"),
        "t_relay_s": (MEASURED, "the server's store-and-forward time between two hops (split)"),
        "t_cmp_s": t_cmp,
        "cmp_real_s": (MEASURED, "the local (tiny) model's real compute on this CPU"),
        "overrun_s": (MEASURED, "real work beyond the profile's time (compute: profile)"),
        "energy_j": (MODELLED, "profile powers x measured times: compute power x t_cmp + radio rx power x t_down "
                               "+ radio tx power x t_up"),
        "predicted_latency_s": (MODELLED, "the cost model's prediction the selection decided on"),
        "predicted_energy_j": (MODELLED, "the cost model's prediction the selection decided on"),
        "ms_ssim": (MEASURED, "MS-SSIM of the run's image against the fp32 reference image"),
    }
    return {k: {"kind": kind, "how": how} for k, (kind, how) in labels.items()}


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


def image_size(shape: list[int] | None, resolution_px: int) -> dict[str, Any]:
    """The image's real size (image.png is saved as the model made it: an upscaled copy
    would show detail the model did not make, and MS-SSIM is computed at this size), and
    what `resolution_px` is when it differs."""
    if not shape:
        return {}
    height, width = int(shape[0]), int(shape[1])
    doc: dict[str, Any] = {"image_width_px": width, "image_height_px": height}
    if (width, height) != (resolution_px, resolution_px):
        doc["resolution_note"] = (f"image.png is the model's own {width} x {height} px; resolution_px "
                                  f"({resolution_px}) is the SD1.5 resolution that the profiles' step times "
                                  "and split's and patch's feature sizes assume")
    return doc


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
        **image_size(image.get("image_shape"), wl.resolution_px),
        "backend": cell.backend_name,
        "netem": bool(status.get("netem")),
        "delay_path": (status.get("impairments") or {}).get("path", "none"),  # netem | nfqueue+iptables | none
        "impairments": (status.get("impairments") or {}),
        "shaping": "htb",
        "warnings": list(cell.warnings),
        "broker": getattr(broker, "kind", None),
        "timing": "wall clock (time.time) of one kernel: t_down = agent receive - server publish, "
                  "t_cmp = agent send - agent receive, t_up = server receive - agent send",
        "energy": "modelled: profile compute power x t_cmp + radio rx power x t_down + radio tx power x t_up",
        "labels": number_labels(wl.compute),
        "versions": versions(getattr(broker, "kind", None)),
        "git_commit": git_commit(),
    }
