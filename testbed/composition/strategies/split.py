"""Split diffusion (the paper's baseline): the UNet cut in two over a pair of devices,
features crossing the links at every denoising step.

`plan` picks the (head, tail) pair and the step count that fit the budgets
(selection/split_plan.py); `execute` runs the split orchestrator (relay/split.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from testbed.composition.strategies.base import Outcome, PlanContext, RunContext
from testbed.selection.split_plan import SplitPlan, plan_split

__all__ = ["Split", "feature_bytes_fn", "largest_message_bytes", "FEATURE_BYTES_FP32", "PAIR_CHOICE"]

PAIR_CHOICE = "best-pair"


def feature_bytes_fn(resolution_px: int) -> Callable[[str], int]:
    """Wire size of one step's cut tensors for a head of a given precision (SD1.5's shapes)."""
    from testbed.diffusion.split import sd15_split_bytes_per_step
    from testbed.selection.split_plan import activation_bytes

    return lambda precision: sd15_split_bytes_per_step(resolution_px, activation_bytes(precision), 2)


#: One step's cut tensors with an fp32 head (CFG batch 2), by resolution: what
#: `feature_bytes_fn(px)("fp32")` computes on the meta device in seconds (checked by a
#: test), kept here so that sizing a broker does not have to build SD1.5's UNet.
FEATURE_BYTES_FP32 = {256: 13_918_208, 512: 54_222_848}


def largest_message_bytes(resolution_px: int) -> int:
    """The largest message a split run sends at this resolution."""
    return FEATURE_BYTES_FP32[resolution_px]


class Split:
    method: ClassVar[str] = "split"

    def __init__(self, strategy: str = PAIR_CHOICE):
        self.strategy = PAIR_CHOICE  # the pair is chosen by its step count; selection strategies do not apply

    def plan(self, ctx: PlanContext) -> SplitPlan:
        fbytes = feature_bytes_fn(ctx.topology.workload.resolution_px)
        return plan_split(ctx.topology, ctx.links, ctx.t_max_s, ctx.e_max_j, fbytes, impairments=ctx.impairments)

    async def execute(self, run: RunContext, plan: SplitPlan) -> Outcome:
        from testbed.relay.split import SplitOrchestrator

        topo, wl = run.topology, run.topology.workload
        await run.ensure_agents([plan.head, plan.tail])
        model = await run.server_model()
        rs = run.relay_settings()

        async def orchestrate() -> Any:
            orch = SplitOrchestrator(
                **rs.login(), plan=plan, power=run.power(), model=model.model, prompt=wl.prompt,
                seed=topo.seed, scheduler=wl.scheduler, payload_bytes=wl.payload_bytes, emit=run.event_sink(),
            )
            return await orch.run()

        out = await run.in_server_ns(orchestrate)
        stages = [r.to_json() for r in out.records]
        by_device = {plan.head: sum(r.e_head_j for r in out.records), plan.tail: sum(r.e_tail_j for r in out.records)}
        return Outcome(stages=stages, latent=out.latent, latency_s=out.latency_s, energy_j=out.energy_j,
                       total_steps=out.total_steps, relay_order=[plan.head, plan.tail], energy_by_device=by_device,
                       extra={"plan": plan.to_json()})
