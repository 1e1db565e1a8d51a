"""Re-selection after a failure (selection/recovery.py) and the multistage strategy's plan:
exactly the remaining stages, each strategy's objective, the budgets left less the margin,
and errors that say which budget is short."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from testbed.methods.base import PlanContext
from testbed.methods.multistage.strategy import Multistage
from testbed.errors import InfeasibleError, TopologyError
from testbed.model.radio import compute_links
from testbed.model.topology import load_topology, place
from testbed.selection import DeviceCost, device_costs, fair_weights
from testbed.selection.recovery import reselect

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"


def _costs(t, e, s) -> list[DeviceCost]:
    return [DeviceCost.from_parts(f"d{i:02d}", float(si), float(ti), 0.0, 0.0, float(ei), 0.0, 0.0)
            for i, (ti, ei, si) in enumerate(zip(t, e, s, strict=True))]


def _best_by_brute_force(costs, n, t_max, e_max, value):
    best = None
    for combo in itertools.combinations(costs, n):
        if sum(c.latency_s for c in combo) <= t_max and sum(c.energy_j for c in combo) <= e_max:
            v = sum(value(c) for c in combo)
            best = v if best is None else max(best, v)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_dp_and_exact_find_the_best_chain_of_exactly_the_remaining_stages(seed):
    rng = np.random.default_rng(seed)
    costs = _costs(rng.uniform(0.2, 1.0, 9), rng.uniform(5, 40, 9), rng.choice([400, 800, 1700, 3400], 9))
    n = int(rng.integers(1, 4))
    t_max, e_max = float(rng.uniform(0.6, 2.5)), float(rng.uniform(30, 100))
    best = _best_by_brute_force(costs, n, t_max, e_max, lambda c: c.size_mb)
    for strategy in ("dp", "exact"):
        if best is None:
            with pytest.raises(InfeasibleError):
                reselect(costs, n, t_max, e_max, strategy)
            continue
        sel = reselect(costs, n, t_max, e_max, strategy)
        assert len(sel.selected) == n  # the schedule's step count is fixed: never more, never fewer
        assert sel.latency_s <= t_max and sel.energy_j <= e_max
        assert sel.objective_mb == pytest.approx(best)


def test_more_room_does_not_lengthen_the_chain():
    costs = _costs([0.1] * 6, [1.0] * 6, [1, 2, 3, 4, 5, 6])
    sel = reselect(costs, 2, 10.0, 100.0, "dp")
    assert sel.selected == ["d05", "d04"]  # the two largest, in relay order; select() would take all six


def test_fair_discounts_the_devices_that_spent_most():
    costs = _costs([0.3] * 4, [10.0] * 4, [4000, 3000, 1000, 900])
    history = {"d00": 100.0, "d01": 100.0, "d02": 0.0, "d03": 0.0}
    weights = dict(zip([c.id for c in costs], fair_weights(costs, history), strict=True))
    best = _best_by_brute_force(costs, 2, 1.0, 100.0, lambda c: c.size_mb * weights[c.id])
    sel = reselect(costs, 2, 1.0, 100.0, "fair", history=history)
    assert sum(c.size_mb * weights[c.id] for c in sel.chosen) == pytest.approx(best)
    assert reselect(costs, 2, 1.0, 100.0, "dp").selected == ["d00", "d01"]  # without the history


def test_random_and_greedy_walk_their_order_until_the_chain_is_full():
    costs = _costs([0.2, 0.3, 0.25, 0.4, 0.35], [5.0] * 5, [100, 900, 300, 1200, 50])
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(5)
        want = [costs[i].id for i in order[:2]]  # everything fits: the first two of the seeded order
        assert sorted(reselect(costs, 2, 10.0, 100.0, "random", seed=seed).selected) == sorted(want)
    density = np.array([c.size_mb / (c.latency_s / 10.0 + c.energy_j / 100.0) for c in costs])
    want = {costs[i].id for i in np.argsort(-density, kind="stable")[:3]}
    assert set(reselect(costs, 3, 10.0, 100.0, "greedy").selected) == want


def test_errors_say_what_is_short():
    costs = _costs([0.5, 0.6, 0.7], [10.0, 20.0, 30.0], [1, 2, 3])
    with pytest.raises(InfeasibleError, match=r"the 2 quickest need 1.100 s"):
        reselect(costs, 2, 1.0, 100.0)
    with pytest.raises(InfeasibleError, match=r"the 2 most frugal need 30.0 J"):
        reselect(costs, 2, 5.0, 25.0)
    with pytest.raises(InfeasibleError, match=r"2 device\(s\) remain for 3 remaining stage"):
        reselect(costs[:2], 3, 5.0, 100.0)
    with pytest.raises(InfeasibleError, match=r"no T_max left \(-0.2 s\)"):
        reselect(costs, 1, -0.2, 100.0)
    with pytest.raises(TopologyError, match="unknown selector"):
        reselect(costs, 1, 1.0, 1.0, "magic")
    # a chain exists, but the baseline's order blocks it: say so instead of "nothing fits"
    blocker = _costs([0.9, 0.5, 0.5], [1.0, 1.0, 1.0], [5, 1, 1])
    with pytest.raises(InfeasibleError, match="greedy order filled 1 of the 2.*a chain exists"):
        reselect(blocker, 2, 1.2, 100.0, "greedy")
    assert sorted(reselect(blocker, 2, 1.2, 100.0, "dp").selected) == ["d01", "d02"]


def _paper_ctx(margin_pct: float, t_max_s: float = 2.0) -> PlanContext:
    topo = load_topology(TOPOLOGIES / "paper.yaml")
    topo = topo.model_copy(update={"budgets": topo.budgets.model_copy(update={"margin_pct": margin_pct})})
    return PlanContext(topo, compute_links(topo, place(topo)), t_max_s, 200.0, topo.seed)


def test_the_plan_fills_the_budgets_less_the_margin():
    # T_max 4 s on paper.yaml: the best chain without a margin needs more than 98 % of it
    plain, margined = Multistage("dp").plan(_paper_ctx(0.0, 4.0)), Multistage("dp").plan(_paper_ctx(2.0, 4.0))
    assert margined.predicted_latency_s <= 4.0 * 0.98 < plain.predicted_latency_s <= 4.0
    assert margined.to_json()["planned_within"] == {"t_max_s": pytest.approx(3.92), "e_max_j": pytest.approx(196.0),
                                                    "margin_pct": 2.0}


def test_the_plan_re_plans_with_its_own_strategy_keeping_the_margin_in_reserve():
    ctx = _paper_ctx(2.0, t_max_s=4.0)
    for strategy in ("dp", "random"):
        plan = Multistage(strategy).plan(ctx)
        pool = [c.id for c in plan.costs if c.id not in plan.selected[:1]]
        chain = plan.replan(4.0, 200.0)(pool, 2, 2.5, 150.0)
        # the same answer as the strategy's re-selection under the budgets left less 2 % of each budget
        want = reselect([c for c in plan.costs if c.id in pool], 2, 2.5 - 0.08, 150.0 - 4.0, strategy, seed=ctx.seed)
        assert chain == want.selected and len(chain) == 2


def test_costs_used_by_the_plan_are_the_cost_model():
    ctx = _paper_ctx(0.0)
    plan = Multistage("dp").plan(ctx)
    assert plan.costs == device_costs(ctx.topology, ctx.links)
    assert all(c.t_handling_s > 0 for c in plan.costs)  # the server's handling is in every stage's time
