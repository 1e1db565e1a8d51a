"""Split diffusion under a budget (pure): pair choice, step count, per-step cost components."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from testbed.errors import InfeasibleError
from testbed.model.profiles import load_profiles, step_time_s
from testbed.model.radio import compute_links
from testbed.methods.split.plan import HEAD_FLOP_SHARE, pair_cost, plan_split
from testbed.selection.costs import DEFAULT_MESSAGE_OVERHEAD_S, HANDLING_S_PER_MB, activation_bytes, handling_s
from testbed.model.topology import load_topology, place

REPO = Path(__file__).resolve().parent.parent
FEATS = {"fp32": 13_000_000, "fp16": 6_500_000, "int8": 6_500_000, "int4": 6_500_000}


def fbytes(precision: str) -> int:
    return FEATS[precision]


@pytest.fixture(scope="module")
def paper():
    topo = load_topology(REPO / "topologies" / "paper.yaml")
    return topo, compute_links(topo, place(topo))


def test_pair_cost_components_follow_links_and_profiles(paper):
    topo, links = paper
    h, t = links[0], links[1]
    c = pair_cost(topo, h, t, fbytes)
    eta, per_msg = 0.95, DEFAULT_MESSAGE_OVERHEAD_S  # link efficiency and the calibrated per-message cost (costs.py)
    assert c.t_feat_up_s == pytest.approx(FEATS[h.precision] * 8 / (h.rate_up_mbps * 1e6 * eta) + per_msg)
    assert c.t_feat_down_s == pytest.approx(FEATS[h.precision] * 8 / (t.rate_down_mbps * 1e6 * eta) + per_msg)
    assert c.t_lat_down_s == pytest.approx(262144 * 8 / (h.rate_down_mbps * 1e6 * eta) + per_msg)
    prof = load_profiles()
    assert c.t_head_cmp_s == pytest.approx(HEAD_FLOP_SHARE[256] * step_time_s(prof[h.profile], 256, h.precision))
    assert c.t_tail_cmp_s == pytest.approx((1 - HEAD_FLOP_SHARE[256]) * step_time_s(prof[t.profile], 256, t.precision))
    # the features are handled (encoded, relayed, decoded) outside the links, each end
    # under its CPU quota
    cores = prof[h.profile].cpu_cores, prof[t.profile].cpu_cores
    assert c.t_handling_s > 0
    assert c.t_handling_s == pytest.approx(sum(handling_s(FEATS[h.precision], q) for q in cores))
    assert c.latency_s == pytest.approx(c.t_tran_s + c.t_head_cmp_s + c.t_tail_cmp_s + c.t_handling_s)
    assert c.energy_j == pytest.approx(c.e_head_j + c.e_tail_j) and c.energy_j > 0


def test_handling_grows_with_size_and_a_smaller_quota():
    mb7 = 7_000_000
    assert handling_s(mb7, 1.0) == pytest.approx(HANDLING_S_PER_MB * 7)
    assert handling_s(mb7, 4.0) == handling_s(mb7, 1.0)  # one Python thread: more cores do not help
    assert handling_s(mb7, 0.5) == pytest.approx(1.5 * handling_s(mb7, 1.0))
    assert handling_s(2 * mb7, 1.0) == pytest.approx(2 * handling_s(mb7, 1.0))


def test_the_step_count_includes_handling(paper):
    """A budget that fits N steps by link and compute time alone but not with handling
    gets fewer steps: the plan counts every term it predicts."""
    topo, links = paper
    plan = plan_split(topo, links, 4.0, 1000.0, fbytes)
    c = plan.step
    bare = c.latency_s - c.t_handling_s
    t_max = (plan.steps + 1) * (bare + c.latency_s) / 2  # between N+1 bare steps and N+1 full steps
    fewer = plan_split(topo, links, t_max, 1000.0, fbytes, candidates=[c.head, c.tail])
    assert math.floor(t_max / bare) == plan.steps + 1 and fewer.steps == plan.steps
    assert fewer.predicted_latency_s <= t_max


def test_plan_does_the_most_steps_of_any_pair_and_fits_both_budgets(paper):
    topo, links = paper
    plan = plan_split(topo, links, 4.0, 200.0, fbytes)
    best = max(pair_cost(topo, a, b, fbytes).steps_within(4.0, 200.0)
               for a in links for b in links if a.id != b.id)
    assert plan.steps == best >= 1
    assert plan.pairs_considered == 20 * 19
    assert plan.predicted_latency_s <= 4.0 + 1e-9 and plan.predicted_energy_j <= 200.0 + 1e-9
    assert (plan.steps + 1) * plan.step.latency_s > 4.0 or (plan.steps + 1) * plan.step.energy_j > 200.0


def test_steps_grow_with_tmax_and_split_is_transmission_bound(paper):
    topo, links = paper
    steps = [plan_split(topo, links, t, 1000.0, fbytes).steps for t in (2.0, 4.0, 8.0, 16.0)]
    assert steps == sorted(steps) and steps[-1] > steps[0]
    plan = plan_split(topo, links, 4.0, 1000.0, fbytes)
    assert plan.step.t_tran_s / plan.step.latency_s > 0.5


def test_energy_budget_limits_steps(paper):
    topo, links = paper
    plan = plan_split(topo, links, 100.0, 30.0, fbytes)
    assert plan.steps == math.floor(30.0 / plan.step.energy_j + 1e-9)


def test_infeasible_budget_names_the_cheapest_step(paper):
    topo, links = paper
    with pytest.raises(InfeasibleError) as e:
        plan_split(topo, links, 0.05, 200.0, fbytes)
    assert "not one step fits" in str(e.value) and "MB of features" in str(e.value)


def test_activation_bytes():
    assert activation_bytes("fp32") == 4 and {activation_bytes(p) for p in ("fp16", "int8", "int4")} == {2}


def test_head_flop_share_matches_a_count_on_sd15():
    spec = importlib.util.spec_from_file_location("sweep_split_flops", REPO / "bench" / "sweep_split_flops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _, _, share = mod.head_share(256)
    assert share == pytest.approx(HEAD_FLOP_SHARE[256], abs=0.002)
