"""Split diffusion (the paper's baseline): the UNet cut in two over a pair of devices,
features crossing the links at every denoising step.

`plan` picks the (head, tail) pair and the step count that fit the budgets (plan.py);
`execute` runs the split orchestrator (orchestrator.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

from testbed.methods.base import Outcome, PlanContext, RunContext
from testbed.methods.split.plan import SplitPlan, plan_split
from testbed.methods.split.sizes import feature_bytes_fn

__all__ = ["Split", "PAIR_CHOICE"]

PAIR_CHOICE = "best-pair"


class Split:
    """The pair is chosen by its step count: device selectors do not apply."""

    name: ClassVar[str] = "split"
    selector = PAIR_CHOICE

    def plan(self, ctx: PlanContext) -> SplitPlan:
        fbytes = feature_bytes_fn(ctx.topology.workload.resolution_px)
        return plan_split(ctx.topology, ctx.links, ctx.t_max_s, ctx.e_max_j, fbytes, impairments=ctx.impairments)

    async def execute(self, run: RunContext, plan: SplitPlan) -> Outcome:
        from testbed.methods.split.orchestrator import SplitOrchestrator

        await run.services.ensure_agents([plan.head, plan.tail])
        # a step's hops cross the links four times and carry megabytes: a wider bound than a stage's
        timing = replace(run.timing(2), deadline_factor=3.0, deadline_slack_s=5.0)
        out = await run.orchestrate(lambda settings, job, power: SplitOrchestrator(
            settings, job, power, plan=plan, emit=run.services.event_sink(), timing=timing))
        by_device = {plan.head: sum(r.e_head_j for r in out.records), plan.tail: sum(r.e_tail_j for r in out.records)}
        return Outcome(stages=[r.to_json() for r in out.records], latent=out.latent, latency_s=out.latency_s,
                       energy_j=out.energy_j, total_steps=out.total_steps, relay_order=[plan.head, plan.tail],
                       energy_by_device=by_device, extra={"plan": plan.to_json()})
