"""Multi-stage diffusion (the paper's temporal collaboration): a latent relayed through a
chain of devices, K denoising steps each, the chain chosen under T_max and E_max.

`plan` runs the device selector (selection/: dp, exact, random, greedy, fair — `fair`
with the cell's energy history) under the budgets less the topology's `margin_pct`;
`execute` runs the multi-stage orchestrator (orchestrator.py) with checkpoint recovery,
whose `replan` is the same selector, re-run after a failure for the remaining stages on the
remaining devices under the budgets left (selection/recovery.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from testbed.errors import TopologyError
from testbed.methods.base import Outcome, PlanContext, RunContext, energy_by_device
from testbed.selection import DeviceCost, Selection, device_costs, select
from testbed.selection.costs import planning_budgets
from testbed.selection.recovery import reselect

__all__ = ["Multistage", "MultistagePlan", "fixed_selection"]


@dataclass(frozen=True)
class MultistagePlan:
    selection: Selection
    costs: list[DeviceCost] = field(repr=False)  # every candidate: the chain and the recovery pool
    margin_pct: float = 0.0  # the share of each budget the plan left unused (budgets.margin_pct)
    seed: int = 0
    history: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def selected(self) -> list[str]:
        return list(self.selection.selected)

    @property
    def predicted_latency_s(self) -> float:
        return self.selection.latency_s

    @property
    def predicted_energy_j(self) -> float:
        return self.selection.energy_j

    @property
    def can_recover(self) -> bool:
        """A device of the chain can be replaced when a candidate is left over."""
        return len(self.costs) > len(self.selection.selected)

    def to_json(self) -> dict[str, Any]:
        s = self.selection
        return {"selector": s.selector, "strategy": s.selector, "selected": list(s.selected),
                "predicted_latency_s": s.latency_s, "predicted_energy_j": s.energy_j, "objective_mb": s.objective_mb,
                "solve_ms": s.solve_ms,
                "planned_within": {"t_max_s": s.t_max_s, "e_max_j": s.e_max_j, "margin_pct": self.margin_pct}}

    def replan(self, t_max_s: float, e_max_j: float):
        """The orchestrator's re-planner (orchestrator.py Replan): this plan's selector for
        the remaining stages, under the budgets left less the margin the plan kept."""
        by_id = {c.id: c for c in self.costs}
        selector = "dp" if self.selection.selector == "fixed" else self.selection.selector
        reserve_t, reserve_e = t_max_s * self.margin_pct / 100, e_max_j * self.margin_pct / 100

        def replan(pool: list[str], stages: int, t_left_s: float, e_left_j: float) -> list[str]:
            return reselect([by_id[d] for d in pool], stages, t_left_s - reserve_t, e_left_j - reserve_e,
                            selector=selector, seed=self.seed, history=self.history).selected

        return replan


def fixed_selection(costs: list[DeviceCost], order: list[str], t_max_s: float, e_max_j: float) -> Selection:
    """A selection that is given, not solved (benchmarks relay through chosen devices)."""
    by_id = {c.id: c for c in costs}
    unknown = [d for d in order if d not in by_id]
    if unknown:
        raise TopologyError(f"relay order names unknown or unavailable devices {unknown}; devices: {', '.join(by_id)}")
    chosen = [by_id[d] for d in order]
    return Selection(selector="fixed", t_max_s=t_max_s, e_max_j=e_max_j, devices=list(costs), selected=list(order),
                     objective_mb=sum(c.size_mb for c in chosen), latency_s=sum(c.latency_s for c in chosen),
                     energy_j=sum(c.energy_j for c in chosen), solve_ms=0.0, chosen=chosen)


class Multistage:
    """`Multistage("dp")`; `order=[...]` relays through given devices instead."""

    name: ClassVar[str] = "multistage"

    def __init__(self, selector: str = "dp", order: list[str] | None = None):
        self.selector = selector if order is None else "fixed"
        self.order = list(order) if order is not None else None

    def plan(self, ctx: PlanContext) -> MultistagePlan:
        costs = device_costs(ctx.topology, ctx.links, impairments=ctx.impairments)
        t_plan_s, e_plan_j = planning_budgets(ctx.topology, ctx.t_max_s, ctx.e_max_j)
        if self.order is not None:
            sel = fixed_selection(costs, self.order, t_plan_s, e_plan_j)
        else:
            sel = select(costs, t_plan_s, e_plan_j, selector=self.selector, seed=ctx.seed, history=ctx.history)
        return MultistagePlan(sel, costs, ctx.topology.budgets.margin_pct, ctx.seed, dict(ctx.history))

    async def execute(self, run: RunContext, plan: MultistagePlan) -> Outcome:
        from testbed.methods.multistage.orchestrator import MultistageOrchestrator

        candidates = [c.id for c in plan.costs]
        # wait for the chain; a recovery picks among the others online by then (the quickest first)
        spare = [c.id for c in sorted(plan.costs, key=lambda c: c.latency_s) if c.id not in plan.selected]
        await run.services.ensure_agents(plan.selected, spare=spare)
        timing = run.timing(len(candidates))
        wl = run.topology.workload
        out = await run.orchestrate(lambda settings, job, power: MultistageOrchestrator(
            settings, job, power, plan=plan, steps_per_stage=wl.steps_per_stage, t_max_s=run.t_max_s,
            e_max_j=run.e_max_j, emit=run.services.event_sink(), timing=timing))
        # a failed attempt's energy was spent by the device that failed
        spent = [(s.device, s.energy_j) for s in out.stages] + [(r.device, r.energy_j) for r in out.recovered]
        return Outcome(
            stages=[s.to_json() for s in out.stages], latent=out.latent, latency_s=out.latency_s,
            energy_j=out.energy_j, total_steps=out.total_steps, relay_order=[s.device for s in out.stages],
            energy_by_device=energy_by_device(spent), recovered=[r.to_json() for r in out.recovered],
            rejected_results=out.rejected_results, extra={"objective_mb": plan.selection.objective_mb},
        )
