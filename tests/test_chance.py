"""Chance-constrained selection (pure): on point distributions it is the mean-based DP; on
lossy links it keeps its probability, matches the enumeration reference, and the
reference matches a brute force written independently."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from testbed.errors import InfeasibleError, TopologyError
from testbed.model.radio import compute_links
from testbed.model.topology import load_topology, parse_topology, place
from testbed.selection import select, solvers
from testbed.selection.chance import exact_chance, latency_draws, p_within, select_chance
from testbed.selection.costs import device_costs
from testbed.selection.stochastic import stage_distributions

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


def instance(n: int, seed: int, links: str = "links: {delay_ms: 20, loss_pct: 1}"):
    topo = parse_topology(f"seed: {seed}\ndevices: {{count: {n}}}\nradio: {{shadowing: true}}\n{links}\n")
    dl = compute_links(topo, place(topo))
    costs = device_costs(topo, dl)
    return costs, stage_distributions(topo, dl, costs=costs)


@pytest.mark.parametrize("t_max", [1.5, 2.0, 4.0])
@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.99])
def test_point_distributions_give_the_mean_based_plan(t_max, confidence):
    topo = load_topology(REPO / "topologies/paper.yaml")
    dl = compute_links(topo, place(topo))
    costs = device_costs(topo, dl)
    stages = stage_distributions(topo, dl, costs=costs)
    got = select_chance(costs, stages, t_max, 200.0, confidence)
    want = select(costs, t_max, 200.0)
    assert got.selection.objective_mb == pytest.approx(want.objective_mb)
    assert got.p_within == 1.0
    assert got.latency.mean() == pytest.approx(want.latency_s)


@pytest.mark.parametrize("seed", range(1000, 1008))
def test_lossy_plans_keep_their_probability_and_match_the_reference(seed):
    costs, stages = instance(12, seed)
    draws = latency_draws(stages)
    ids = [c.id for c in costs]
    for t_max in (2.0, 3.0):
        got = select_chance(costs, stages, t_max, 200.0, 0.9)
        ref = select_chance(costs, stages, t_max, 200.0, 0.9, selector="exact")
        idx = [ids.index(i) for i in got.selection.selected]
        assert got.p_within == p_within(draws, idx, t_max) >= 0.9
        assert got.selection.energy_j <= 200.0
        assert ref.p_within >= 0.9 and got.selection.objective_mb <= ref.selection.objective_mb + 1e-9
        assert got.selection.objective_mb >= 0.9 * ref.selection.objective_mb
        mean_plan = select(costs, t_max, 200.0)
        assert got.selection.objective_mb <= mean_plan.objective_mb + 1e-9  # a constraint never adds value


def test_the_mean_based_plan_misses_its_budget_often_on_lossy_links():
    """Why the constraint exists: the mean-based DP fills T_max with mean latencies, so its
    plan keeps T_max with probability near one half, the chance-constrained one with 0.9."""
    costs, stages = instance(12, 1001)
    draws = latency_draws(stages)
    ids = [c.id for c in costs]
    plan = select(costs, 3.0, 200.0)
    assert p_within(draws, [ids.index(i) for i in plan.selected], 3.0) < 0.8
    assert select_chance(costs, stages, 3.0, 200.0, 0.9).p_within >= 0.9


def test_exact_reference_is_a_brute_force():
    costs, stages = instance(8, 1003)
    draws = latency_draws(stages)
    e = np.array([c.energy_j for c in costs])
    v = np.array([c.size_mb for c in costs])
    for t_max, conf in ((1.6, 0.9), (2.5, 0.8), (3.5, 0.95)):
        best = 0.0
        for k in range(1, len(costs) + 1):
            for sub in itertools.combinations(range(len(costs)), k):
                if e[list(sub)].sum() <= 200.0 and np.mean(draws[list(sub)].sum(0) <= t_max) >= conf:
                    best = max(best, float(v[list(sub)].sum()))
        idx, _ = exact_chance(draws, e, v, t_max, 200.0, conf)
        assert float(v[idx].sum()) == pytest.approx(best)


def test_higher_confidence_never_buys_more():
    costs, stages = instance(10, 1002)
    values = [select_chance(costs, stages, 3.0, 200.0, p, selector="exact").selection.objective_mb
              for p in (0.5, 0.8, 0.9, 0.99)]
    assert values == sorted(values, reverse=True) and values[0] > values[-1]


@pytest.mark.parametrize("strategy", ["random", "greedy", "fair", "exact"])
def test_every_strategy_keeps_both_constraints(strategy):
    costs, stages = instance(10, 1004)
    got = select_chance(costs, stages, 2.5, 100.0, 0.9, selector=strategy, history={"dev01": 50.0})
    assert got.p_within >= 0.9 and got.selection.energy_j <= 100.0 and got.selection.selected
    q = got.latency_quantiles_s
    assert list(q) == ["p10", "p50", "p90", "p95"] and q["p90"] <= 2.5
    doc = got.to_json()
    assert doc["confidence"] == 0.9 and doc["p_within"] == got.p_within and doc["selected"] == got.selection.selected


def test_bad_confidence_and_infeasible_budgets_say_what_to_change():
    costs, stages = instance(6, 1000)
    for bad in (0, 1, 1.5, -0.1, float("nan")):
        with pytest.raises(TopologyError, match="confidence"):
            select_chance(costs, stages, 3.0, 200.0, bad)
    with pytest.raises(InfeasibleError, match="lower --confidence"):
        select_chance(costs, stages, 0.9, 200.0, 0.99)
    with pytest.raises(TopologyError, match="same order"):
        select_chance(costs[:3], stages, 3.0, 200.0, 0.9)


def test_dp_table_backtracks_many_cells_at_once():
    costs, _ = instance(12, 1005)
    t = np.array([c.latency_s for c in costs])
    e = np.array([c.energy_j for c in costs])
    v = np.array([c.size_mb for c in costs])
    table = solvers.dp_table(t, e, v, 3.0, 200.0)
    a, b = np.meshgrid(np.arange(0, table.state.shape[1], 7), np.arange(0, table.state.shape[2], 11), indexing="ij")
    for ai, bi, ans in zip(a.ravel(), b.ravel(), table.backtrack(a.ravel(), b.ravel())):
        value, _, sum_t, sum_e = table.state[:, ai, bi]
        assert v[ans].sum() == pytest.approx(value) and t[ans].sum() == pytest.approx(sum_t)
        assert e[ans].sum() == pytest.approx(sum_e)
    assert list(table.best()) == list(solvers.dp(t, e, v, 3.0, 200.0))
