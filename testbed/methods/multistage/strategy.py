"""Multi-stage diffusion (the paper's temporal collaboration): a latent relayed through a
chain of devices, K denoising steps each, the chain chosen under T_max and E_max.

`plan` runs the device selector (selection/: dp, exact, random, greedy, fair — `fair`
with the cell's energy history) under the budgets less the topology's `margin_pct`; with
a confidence P (`PlanContext.confidence`, `--confidence`) the chance-constrained one
(selection/chance.py: P(latency <= T_max) >= P under the modelled stage distributions),
without it today's mean-based plan. Either way the plan keeps a `StageModel`
(selection/predictions.py: each device's stage as a distribution, with the connection's
earlier runs and the delayer's per-pass cost) for what the run records: the stages'
means and quantiles, the run's quantiles, each stage's deadline. `execute` runs the
multi-stage orchestrator (orchestrator.py) with checkpoint recovery, whose `replan` is the
same selector, re-run after a failure for the remaining stages on the remaining devices
under the budgets left (selection/recovery.py) — with the plan's confidence where a chain
keeps it, else the mean-based chain (its probability recorded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from testbed.errors import InfeasibleError, TopologyError
from testbed.methods.base import Outcome, PlanContext, RunContext, energy_by_device
from testbed.selection import DeviceCost, Selection, device_costs, select
from testbed.selection.chance import latency_draws, select_chance
from testbed.selection.costs import planning_budgets
from testbed.selection.predictions import StageModel
from testbed.selection.recovery import Chain, reselect, reselect_chance
from testbed.selection.stochastic import pass_cost_s

__all__ = ["Multistage", "MultistagePlan", "fixed_selection"]


@dataclass(frozen=True)
class MultistagePlan:
    selection: Selection
    costs: list[DeviceCost] = field(repr=False)  # every candidate: the chain and the recovery pool
    margin_pct: float = 0.0  # the share of each budget the plan left unused (budgets.margin_pct)
    seed: int = 0
    history: dict[str, float] = field(default_factory=dict, repr=False)
    model: StageModel | None = field(default=None, repr=False)  # the stages as distributions (None: points only)
    confidence: float | None = None  # the P the plan keeps (None: mean-based)
    t_max_s: float | None = None  # the run's T_max, which `p_within` is the modelled probability of keeping

    @property
    def selected(self) -> list[str]:
        return list(self.selection.selected)

    @property
    def predicted_latency_s(self) -> float:
        """The chain's mean latency: the point model's sum on lossless links, E[T] on lossy ones."""
        return self.model.mean_s(self.selected) if self.model is not None else self.selection.latency_s

    @property
    def predicted_latency_quantiles_s(self) -> dict[str, float] | None:
        return self.model.run_quantiles(self.selected) if self.model is not None else None

    @property
    def p_within(self) -> float | None:
        """Modelled P(latency <= T_max) of the chain."""
        if self.model is None or self.t_max_s is None:
            return None
        return self.model.run(self.selected).share_within(self.t_max_s)

    @property
    def predicted_energy_j(self) -> float:
        return self.selection.energy_j

    @property
    def can_recover(self) -> bool:
        """A device of the chain can be replaced when a candidate is left over."""
        return len(self.costs) > len(self.selection.selected)

    def stage_predicted(self, device: str) -> dict[str, Any]:
        """A stage record's `predicted` for `device` (means, energy, quantiles)."""
        if self.model is not None:
            return self.model.predicted(device)
        c = next(c for c in self.costs if c.id == device)
        return {"t_down_s": c.t_down_s, "t_cmp_s": c.t_cmp_s, "t_up_s": c.t_up_s, "energy_j": c.energy_j}

    def stage_tail_s(self, device: str) -> float | None:
        """The high quantile of the device's stage latency its deadline waits for at least."""
        return self.model.tail_s(device) if self.model is not None else None

    def chain_latency_s(self, chain: list[str]) -> float:
        """A (re-selected) chain's mean latency."""
        if self.model is not None:
            return self.model.mean_s(chain)
        return sum(c.latency_s for c in self.costs if c.id in chain)

    def to_json(self) -> dict[str, Any]:
        s = self.selection
        doc = {"selector": s.selector, "strategy": s.selector, "selected": list(s.selected),
               "predicted_latency_s": self.predicted_latency_s, "predicted_energy_j": s.energy_j,
               "objective_mb": s.objective_mb, "solve_ms": s.solve_ms,
               "planned_within": {"t_max_s": s.t_max_s, "e_max_j": s.e_max_j, "margin_pct": self.margin_pct},
               "point_latency_s": s.latency_s, "confidence": self.confidence, "p_within": self.p_within,
               "predicted_latency_quantiles_s": self.predicted_latency_quantiles_s}
        if self.model is not None:
            doc |= {"messages_before": {d: n for d, n in self.model.messages_before.items() if n},
                    "per_pass_s": self.model.per_pass_s, "stage_model_ms": self.model.build_ms}
        return doc

    def replan(self, t_max_s: float, e_max_j: float):
        """The orchestrator's re-planner (orchestrator.py Replan): this plan's selector for
        the remaining stages, under the budgets left less the margin the plan kept — with
        the plan's confidence where a chain keeps it, else the mean-based chain."""
        by_id = {c.id: c for c in self.costs}
        selector = "dp" if self.selection.selector == "fixed" else self.selection.selector
        reserve_t, reserve_e = t_max_s * self.margin_pct / 100, e_max_j * self.margin_pct / 100

        def replan(pool: list[str], stages: int, t_left_s: float, e_left_j: float) -> Chain:
            costs, t_plan, e_plan = [by_id[d] for d in pool], t_left_s - reserve_t, e_left_j - reserve_e
            if self.confidence is not None and self.model is not None:
                try:
                    sel, _ = reselect_chance(costs, latency_draws(self.model.stages(pool)), stages, t_plan, e_plan,
                                             self.confidence, selector=selector, seed=self.seed,
                                             history=self.history)
                    return self._chain(sel.selected, t_left_s, kept=True)
                except InfeasibleError:
                    pass  # no chain keeps it: the mean-based one, its probability said
            sel = reselect(costs, stages, t_plan, e_plan, selector=selector, seed=self.seed, history=self.history)
            return self._chain(sel.selected, t_left_s, kept=self.confidence is None)

        return replan

    def _chain(self, devices: list[str], t_left_s: float, kept: bool) -> Chain:
        chain = Chain(devices)
        chain.confidence_kept = kept
        if self.model is not None:
            chain.p_within = self.model.run(devices).share_within(t_left_s)
        return chain


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
        model = StageModel(ctx.topology, ctx.links, costs, impairments=ctx.impairments,
                           messages_before=dict(ctx.messages_before), per_pass_s=pass_cost_s(ctx.delay_path),
                           seed=ctx.seed)
        if self.order is not None:
            sel = fixed_selection(costs, self.order, t_plan_s, e_plan_j)
        elif ctx.confidence is not None:
            sel = select_chance(costs, model.stages(c.id for c in costs), t_plan_s, e_plan_j, ctx.confidence,
                                selector=self.selector, seed=ctx.seed, history=ctx.history).selection
        else:
            sel = select(costs, t_plan_s, e_plan_j, selector=self.selector, seed=ctx.seed, history=ctx.history)
        return MultistagePlan(sel, costs, ctx.topology.budgets.margin_pct, ctx.seed, dict(ctx.history), model,
                              ctx.confidence if self.order is None else None, ctx.t_max_s)

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
