"""A collaboration method that lives only in the tests: every step on one device.

It proves the plug-in point (docs/design.md, "Adding a method"): this module and its one
`register(...)` line are all it takes — the run owner, the CLI, the sweep and the device
agents pick it up through the registry (TESTBED_METHODS=solo_method), and no other
file names it. Its plan takes the device with the largest model that fits as many of the
workload's stages as possible by itself under the budgets; its orchestrator is the
multi-stage one with a chain of one (its tasks say `meta.method: solo`, and the agents
serve them with the multi-stage stage handler, as the registry line says).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from testbed.errors import InfeasibleError
from testbed.methods import Line, MethodSpec, register
from testbed.methods.base import Outcome, PlanContext, RunContext, energy_by_device
from testbed.methods.multistage.orchestrator import MultistageOrchestrator
from testbed.selection import DeviceCost, device_costs
from testbed.selection.costs import planning_budgets

register(MethodSpec(
    name="solo", summary="every step on the one device that fits most of them (a test-only plug-in)",
    strategy=f"{__name__}:Solo", agent_handler="testbed.methods.multistage.agent:task_handler",
    recovers=False, own_selector="largest-that-fits", lines={"*": Line("solo", "#8c564b", "P")},
    notes={"recovery": "one device: nobody to take over"},
))


@dataclass(frozen=True)
class SoloPlan:
    device: DeviceCost  # its cost for all `stages` stages in one task
    stages: int

    @property
    def selected(self) -> list[str]:
        return [self.device.id]

    @property
    def predicted_latency_s(self) -> float:
        return self.device.latency_s

    @property
    def predicted_energy_j(self) -> float:
        return self.device.energy_j

    @property
    def costs(self) -> list[Any]:
        return [self.device]

    @property
    def can_recover(self) -> bool:
        return False

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device.id, "stages": self.stages, "predicted_latency_s": self.predicted_latency_s,
                "predicted_energy_j": self.predicted_energy_j}

    def replan(self, t_max_s: float, e_max_j: float):
        def replan(pool: list[str], stages: int, t_left_s: float, e_left_j: float) -> list[str]:
            raise InfeasibleError("solo runs on one device: there is no other to take over")

        return replan


def _stages_on(c: DeviceCost, stages: int) -> DeviceCost:
    """The cost of `stages` stages in one task: one download, one upload, the compute times `stages`."""
    return dataclasses.replace(c, latency_s=c.latency_s + (stages - 1) * c.t_cmp_s,
                               energy_j=c.energy_j + (stages - 1) * c.e_cmp_j, t_cmp_s=stages * c.t_cmp_s,
                               e_cmp_j=stages * c.e_cmp_j)


class Solo:
    name: ClassVar[str] = "solo"
    selector = "largest-that-fits"

    def plan(self, ctx: PlanContext) -> SoloPlan:
        t_s, e_j = planning_budgets(ctx.topology, ctx.t_max_s, ctx.e_max_j)
        best: SoloPlan | None = None
        for c in device_costs(ctx.topology, ctx.links, impairments=ctx.impairments):
            by_t = math.floor((t_s - c.latency_s) / c.t_cmp_s) + 1 if c.t_cmp_s > 0 else 1
            by_e = math.floor((e_j - c.energy_j) / c.e_cmp_j) + 1 if c.e_cmp_j > 0 else 1
            n = min(by_t, by_e, 4)
            if n >= 1 and (best is None or (n, c.size_mb) > (best.stages, best.device.size_mb)):
                best = SoloPlan(_stages_on(c, n), n)
        if best is None:
            raise InfeasibleError(f"solo: no device fits one stage within T_max {ctx.t_max_s:g} s, "
                                  f"E_max {ctx.e_max_j:g} J")
        return best

    async def execute(self, run: RunContext, plan: SoloPlan) -> Outcome:
        await run.services.ensure_agents(plan.selected)
        k = run.topology.workload.steps_per_stage * plan.stages
        out = await run.orchestrate(lambda settings, job, power: SoloOrchestrator(
            settings, job, power, plan=plan, steps_per_stage=k, t_max_s=run.t_max_s, e_max_j=run.e_max_j,
            emit=run.services.event_sink(), timing=run.timing(1)))
        return Outcome(stages=[s.to_json() for s in out.stages], latent=out.latent, latency_s=out.latency_s,
                       energy_j=out.energy_j, total_steps=out.total_steps, relay_order=plan.selected,
                       energy_by_device=energy_by_device([(s.device, s.energy_j) for s in out.stages]))


class SoloOrchestrator(MultistageOrchestrator):
    method = "solo"
