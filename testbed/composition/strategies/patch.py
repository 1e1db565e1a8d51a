"""Patch-parallel diffusion (the paper's spatial collaboration): the latent cut into N row
bands, one per device, every device running the whole UNet on its band at every step with
the other bands' context (DistriFusion's displaced patch parallelism; docs/patch.md).

`plan` picks N, the devices and the step count that fit the budgets
(selection/patch_plan.py); `execute` runs the patch orchestrator (relay/patch.py).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

from testbed.composition.strategies.base import Outcome, PlanContext, RunContext
from testbed.errors import WorkloadError
from testbed.selection.patch_plan import LATENT_ROWS, WARMUP_STEPS, PatchPlan, band_counts, plan_patch

__all__ = ["Patch", "BAND_CHOICE", "model_bands"]

BAND_CHOICE = "best-bands"
_AGENT_STARTUP_S = 60.0  # per 2 CPU cores: importing torch + diffusers and loading a model


@functools.lru_cache(maxsize=8)
def model_bands(model: str, resolution_px: int) -> tuple[tuple[int, ...], int]:
    """(band counts that both the model that runs and SD1.5 at this resolution can be cut
    into, the model's exchange points per step)."""
    from testbed.diffusion.models import load_base_unet
    from testbed.diffusion.patch import PatchUNet, valid_patch_counts

    unet, _, _, _ = load_base_unet(model)
    height = int(unet.config.sample_size)
    points = len(PatchUNet(unet, copy_unet=False).points)
    ok = set(valid_patch_counts(unet, height, max(band_counts(resolution_px) or [2])))
    sd_rows = LATENT_ROWS.get(resolution_px, 0)
    return tuple(n for n in band_counts(resolution_px) if n in ok and sd_rows % n == 0), points


class Patch:
    """`Patch()`; `warmup_steps` synchronous steps come first (default 1, as planned)."""

    method: ClassVar[str] = "patch"

    def __init__(self, strategy: str = BAND_CHOICE, warmup_steps: int = WARMUP_STEPS):
        self.strategy = BAND_CHOICE  # N and the devices are chosen by their step count; selection strategies do not apply
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
        from testbed.relay.patch import PatchOrchestrator

        topo, wl = run.topology, run.topology.workload
        await run.ensure_agents(plan.selected)
        model = await run.server_model()
        rs = run.relay_settings()
        profile = wl.compute == "profile"

        async def orchestrate() -> Any:
            orch = PatchOrchestrator(
                **rs.login(), plan=plan, power=run.power(), model=model.model, prompt=wl.prompt,
                seed=topo.seed, scheduler=wl.scheduler, emit=run.event_sink(),
                online_timeout_s=_AGENT_STARTUP_S + 4.0 * len(plan.selected),
                deadline_factor=2.0 if profile else 20.0, deadline_slack_s=2.0 if profile else 60.0,
                max_message_bytes=rs.max_message_bytes,
            )
            return await orch.run()

        out = await run.in_server_ns(orchestrate)
        by_device: dict[str, float] = {}
        for r in out.records:
            by_device[r.device] = by_device.get(r.device, 0.0) + r.energy_j
        return Outcome(stages=[r.to_json() for r in out.records], latent=out.latent, latency_s=out.latency_s,
                       energy_j=out.energy_j, total_steps=out.total_steps, relay_order=list(plan.selected),
                       energy_by_device=by_device, extra={"plan": plan.to_json(), "patch": out.meta})
