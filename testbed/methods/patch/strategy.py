"""Patch-parallel diffusion (the paper's spatial collaboration): the latent cut into N row
bands, one per device, every device running the whole UNet on its band at every step with
the other bands' context (DistriFusion's displaced patch parallelism; docs/patch.md).

`plan` picks N, the devices and the step count that fit the budgets
(plan.py); `execute` runs the patch orchestrator (orchestrator.py).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

from testbed.methods.base import Outcome, PlanContext, RunContext, energy_by_device
from testbed.errors import WorkloadError
from testbed.methods.patch.plan import LATENT_ROWS, WARMUP_STEPS, PatchPlan, band_counts, plan_patch

__all__ = ["Patch", "BAND_CHOICE", "EMBEDDED_BANDS", "model_bands", "counted_bands"]

BAND_CHOICE = "best-bands"


#: model_bands of the embedded models, so that a plan (and `testbed run`'s check before the
#: cell comes up) needs no torch: loading a model for them took 5-15 s (tests/test_patch_plan.py
#: checks them against the models).
EMBEDDED_BANDS: dict[tuple[str, int], tuple[tuple[int, ...], int]] = {
    ("tiny", 256): ((2, 4), 64), ("tiny", 512): ((2, 4), 64),
    ("digits", 256): ((2, 4), 44), ("digits", 512): ((2, 4), 44),
}


@functools.lru_cache(maxsize=8)
def model_bands(model: str, resolution_px: int) -> tuple[tuple[int, ...], int]:
    """(band counts that both the model that runs and SD1.5 at this resolution can be cut
    into, the model's exchange points per step)."""
    known = EMBEDDED_BANDS.get((model, resolution_px))
    return known if known is not None else counted_bands(model, resolution_px)


def counted_bands(model: str, resolution_px: int) -> tuple[tuple[int, ...], int]:
    """model_bands, counted on the model itself (loaded: seconds)."""
    from testbed.diffusion.models import load_base_unet
    from testbed.diffusion.patch import PatchUNet, valid_patch_counts

    unet, _, _, _ = load_base_unet(model)
    height = int(unet.config.sample_size)
    points = len(PatchUNet(unet, copy_unet=False).points)
    ok = set(valid_patch_counts(unet, height, max(band_counts(resolution_px) or [2])))
    sd_rows = LATENT_ROWS.get(resolution_px, 0)
    return tuple(n for n in band_counts(resolution_px) if n in ok and sd_rows % n == 0), points


class Patch:
    """`Patch()`; `warmup_steps` synchronous steps come first (default 1, as planned). N and
    the devices are chosen by their step count: device selectors do not apply."""

    name: ClassVar[str] = "patch"
    selector = BAND_CHOICE

    def __init__(self, warmup_steps: int = WARMUP_STEPS):
        self.warmup_steps = warmup_steps

    def plan(self, ctx: PlanContext) -> PatchPlan:
        wl = ctx.topology.workload
        options, points = model_bands(wl.model, wl.resolution_px)
        if not options:
            raise WorkloadError(f"patch: model {wl.model!r} cannot be cut into any of the band counts "
                                f"{band_counts(wl.resolution_px)} that SD1.5 at {wl.resolution_px} px allows")
        return plan_patch(ctx.topology, ctx.links, ctx.t_max_s, ctx.e_max_j, band_options=list(options),
                          sync_points=points, warmup_steps=self.warmup_steps, impairments=ctx.impairments)

    async def execute(self, run: RunContext, plan: PatchPlan) -> Outcome:
        from testbed.methods.patch.orchestrator import PatchOrchestrator

        await run.services.ensure_agents(plan.selected)
        timing = run.timing(len(plan.selected))
        out = await run.orchestrate(lambda settings, job, power: PatchOrchestrator(
            settings, job, power, plan=plan, emit=run.services.event_sink(), timing=timing))
        return Outcome(stages=[r.to_json() for r in out.records], latent=out.latent, latency_s=out.latency_s,
                       energy_j=out.energy_j, total_steps=out.total_steps, relay_order=list(plan.selected),
                       energy_by_device=energy_by_device([(r.device, r.energy_j) for r in out.records]),
                       extra={"plan": plan.to_json(), "patch": out.meta})
