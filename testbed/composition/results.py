"""A generation's outputs: the image and its score, the result document, and the files.

    OUT/result.json    the result document (fields in docs/running.md), written atomically
    OUT/events.jsonl   every telemetry event (events.py writes it as they happen)
    OUT/image.png      the generated image
    OUT/logs/          agent-<device>.log, broker.log
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from testbed.composition.meta import run_meta
from testbed.emulation.cell import Cell

__all__ = ["RunResult", "score_image", "result_document", "write_result", "copy_logs"]


@dataclass
class RunResult:
    doc: dict[str, Any]
    out_dir: Path | None
    image_array: np.ndarray | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return self.doc


def score_image(model: Any, latent: Any, out: Path | None, reference: np.ndarray) -> dict[str, Any]:
    """Decode the final latent, save it as OUT/image.png, score it against the reference."""
    from testbed.diffusion.quality import ms_ssim

    img = model.decode(latent)
    info: dict[str, Any] = {"image": None, "ms_ssim": None, "image_shape": list(img.shape), "array": img}
    if out is not None:
        from PIL import Image

        Image.fromarray(img).save(out / "image.png")
        info["image"] = str(out / "image.png")
    info["ms_ssim"] = ms_ssim(img, reference)
    return info


def result_document(*, run_id: str, ctx: Any, collab: Any, plan: Any, outcome: Any, image: dict[str, Any],
                    faults: list[dict[str, Any]], cell: Cell, model: Any, startup: Any,
                    confidence: float | None = None) -> dict[str, Any]:
    """The result document of one generation (`ctx`: its RunContext; `faults`: what was
    injected; `confidence`: the P asked for). `predicted_latency_s` is the plan's mean;
    `predicted_latency_quantiles_s` and each stage's `predicted.quantiles_s` come from its
    modelled distributions (null for a plan made on point values only)."""
    topo = ctx.topology
    for stage in outcome.stages:
        if isinstance(stage.get("predicted"), dict):
            stage["predicted"].setdefault("quantiles_s", None)
    doc = {
        "run": run_id,
        "method": collab.name,
        "selector": collab.selector,
        "strategy": collab.selector,  # the older name of `selector`, kept for scripts
        "seed": topo.seed,
        "selected": list(plan.selected),
        "relay_order": list(outcome.relay_order),
        "stages": outcome.stages,
        "latency_s": outcome.latency_s,
        "energy_j": outcome.energy_j,
        "predicted_latency_s": plan.predicted_latency_s,
        "predicted_latency_quantiles_s": getattr(plan, "predicted_latency_quantiles_s", None),
        "confidence": confidence,
        "predicted_energy_j": plan.predicted_energy_j,
        "t_max_s": ctx.t_max_s,
        "e_max_j": ctx.e_max_j,
        "within_budget": {"latency": outcome.latency_s <= ctx.t_max_s, "energy": outcome.energy_j <= ctx.e_max_j},
        "total_steps": outcome.total_steps,
        "ms_ssim": image.get("ms_ssim"),
        "image": image.get("image"),
        "recovered": outcome.recovered,
        "faults": faults,
        **outcome.extra,
    }
    doc["meta"] = run_meta(topo, cell, outcome, model, image) | {"plan": plan.to_json(), "startup": startup.to_json()}
    return doc


def write_result(out: Path, doc: dict[str, Any]) -> Path:
    """OUT/result.json, written whole or not at all (a reader never sees half a document)."""
    path = out / "result.json"
    tmp = out / f".result.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def copy_logs(cell: Cell, state_dir: Path | None, dest: Path) -> None:
    """The agents' and the broker's logs of this run, next to its result. The agents' logs
    are root's (the run's 0700 `logs/`); the broker's lies in a directory its own user
    writes, so it is read through the handle (`read_log`: no link followed, its last MiB)."""
    if state_dir is not None:
        for src in sorted((state_dir / "logs").glob("agent-*.log")):
            with contextlib.suppress(OSError):
                shutil.copy2(src, dest / src.name)
    if cell.broker is not None:
        text = cell.broker.read_log()
        if text:
            with contextlib.suppress(OSError):
                (dest / "broker.log").write_text(text)
