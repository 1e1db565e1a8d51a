"""Device selection: cost model, DP vs exact vs brute force, feasibility, baselines, CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.cli import main
from testbed.errors import InfeasibleError, TopologyError
from testbed.model.profiles import load_profiles, model_size_bytes
from testbed.model.radio import compute_links
from testbed.selection import (
    STRATEGIES,
    DeviceCost,
    device_costs,
    fair_weights,
    relay_order,
    select,
    solvers,
)
from testbed.selection.costs import DEFAULT_MESSAGE_OVERHEAD_S, RELAY_CALIBRATION, RelayCalibration, planning_budgets
from testbed.model.topology import load_topology, place

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"


def _costs_of(t, e, v) -> list[DeviceCost]:
    return [
        DeviceCost.from_parts(f"d{i:02d}", float(v[i]), 0.0, float(t[i]), 0.0, 0.0, float(e[i]), 0.0)
        for i in range(len(t))
    ]


def _brute(t, e, v, t_max, e_max) -> float:
    best = 0.0
    for r in range(1, len(t) + 1):
        for combo in itertools.combinations(range(len(t)), r):
            c = list(combo)
            if solvers.fits(t[c].sum(), e[c].sum(), t_max, e_max):
                best = max(best, float(v[c].sum()))
    return best


@pytest.fixture(scope="module")
def small():
    topo = load_topology(TOPOLOGIES / "small.yaml")
    return topo, device_costs(topo, compute_links(topo, place(topo)))


@pytest.fixture(scope="module")
def paper():
    topo = load_topology(TOPOLOGIES / "paper.yaml")
    return topo, device_costs(topo, compute_links(topo, place(topo)))


# --- cost model ------------------------------------------------------------------------


#: distinct values, so that a term counted twice or in the wrong place shows
CAL = RelayCalibration(message_overhead_s=0.002, encode_s_per_mb=0.01, decode_s_per_mb=0.03, relay_handling_s=0.004,
                       pad_late_s=0.005)


def test_cost_model_follows_links_profiles_and_workload(small):
    topo, _ = small
    links = compute_links(topo, place(topo))
    costs = device_costs(topo, links, calibration=CAL)
    profiles = load_profiles()
    wl = topo.workload
    mb = wl.payload_bytes / 1e6
    for c, link in zip(costs, links, strict=True):
        prof = profiles[link.profile]
        assert c.id == link.id
        assert c.t_down_s == pytest.approx(wl.payload_bytes * 8 / (link.rate_down_mbps * 1e6 * 0.95) + 0.002)
        # the device encodes its result after stamping t_send, under its CPU quota
        assert c.t_up_s == pytest.approx(wl.payload_bytes * 8 / (link.rate_up_mbps * 1e6 * 0.95) + 0.002
                                         + 0.01 * mb / min(1.0, prof.cpu_cores))
        assert c.t_cmp_s == pytest.approx(wl.steps_per_stage * prof.step_time_s[wl.resolution_px][link.precision]
                                          + 0.005)
        assert c.t_handling_s == pytest.approx(0.004 + (0.01 + 0.03) * mb)  # decode the result, encode the next task
        assert c.e_cmp_j == pytest.approx(prof.compute_power_w * c.t_cmp_s)
        assert c.e_down_j == pytest.approx(prof.radio_rx_power_w * c.t_down_s)
        assert c.e_up_j == pytest.approx(prof.radio_tx_power_w * c.t_up_s)
        assert c.latency_s == pytest.approx(c.t_down_s + c.t_cmp_s + c.t_up_s + c.t_handling_s)
        assert c.energy_j == pytest.approx(c.e_down_j + c.e_cmp_j + c.e_up_j)  # the server's handling: no device energy
        assert c.size_mb == pytest.approx(model_size_bytes(link.precision) / 1e6)


def test_real_compute_has_no_padding_term(small):
    topo, _ = small
    links = compute_links(topo, place(topo))
    real = topo.model_copy(update={"workload": topo.workload.model_copy(update={"compute": "real"})})
    padded, unpadded = device_costs(topo, links, calibration=CAL), device_costs(real, links, calibration=CAL)
    for p, r in zip(padded, unpadded, strict=True):
        assert p.t_cmp_s - r.t_cmp_s == pytest.approx(CAL.pad_late_s)


def test_the_default_calibration_is_the_documented_one(small):
    topo, base = small
    assert base == device_costs(topo, compute_links(topo, place(topo)), calibration=RELAY_CALIBRATION)
    assert DEFAULT_MESSAGE_OVERHEAD_S == RELAY_CALIBRATION.message_overhead_s


def test_link_efficiency_and_size_overrides(small):
    topo, _ = small
    links = compute_links(topo, place(topo))
    base = device_costs(topo, links, calibration=CAL)
    ideal = device_costs(topo, links, link_efficiency=1.0, message_overhead_s=0.0, calibration=CAL)
    profiles = load_profiles()
    for b, i, link in zip(base, ideal, links, strict=True):
        enc = CAL.encode_s(topo.workload.payload_bytes, profiles[link.profile].cpu_cores)  # the device's, in both
        assert b.t_down_s == pytest.approx(i.t_down_s / 0.95 + 0.002)
        assert b.t_up_s == pytest.approx((i.t_up_s - enc) / 0.95 + enc + 0.002)
        assert b.t_cmp_s == i.t_cmp_s
    sized = device_costs(topo, links, sizes_mb={"fp16": 123.0, "dev01": 7.5})
    assert [c.size_mb for c in sized][:2] == [7.5, 123.0]
    assert sized[2].size_mb == base[2].size_mb
    with pytest.raises(TopologyError, match="link_efficiency"):
        device_costs(topo, links, link_efficiency=1.5)
    with pytest.raises(TopologyError, match="message_overhead_s"):
        device_costs(topo, links, message_overhead_s=-1)


def test_margin_leaves_a_share_of_each_budget_unused(small):
    topo, _ = small
    assert planning_budgets(topo, 2.0, 70.0) == (2.0, 70.0)  # no margin unless the topology sets one
    margined = topo.model_copy(update={"budgets": topo.budgets.model_copy(update={"margin_pct": 2.0})})
    t, e = planning_budgets(margined, 2.0, 70.0)
    assert t == pytest.approx(1.96) and e == pytest.approx(68.6)


# --- optimality ------------------------------------------------------------------------

_small_instance = st.integers(1, 9).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(1, 60), min_size=n, max_size=n),
        st.lists(st.integers(1, 60), min_size=n, max_size=n),
        st.lists(st.sampled_from([430.0, 860.0, 1719.0, 3438.0, 100.0, 2500.0]), min_size=n, max_size=n),
        st.integers(1, 100),
        st.integers(1, 100),
    )
)


@settings(max_examples=60, deadline=None)
@given(_small_instance)
def test_dp_equals_exact_and_brute_force_when_costs_sit_on_the_grid(inst):
    """Costs that are whole cells lose nothing to rounding: the DP must be optimal."""
    t, e, v = (np.array(x, dtype=float) for x in inst[:3])
    g_t, g_e = inst[3], inst[4]
    t_max, e_max = float(g_t), float(g_e)  # one cell = 1 s and 1 J
    opt = _brute(t, e, v, t_max, e_max)
    dp = solvers.dp(t, e, v, t_max, e_max, grid=(g_t, g_e))
    assert v[dp].sum() == pytest.approx(opt)
    if opt > 0:
        ex = select(_costs_of(t, e, v), t_max, e_max, "exact")
        assert ex.objective_mb == pytest.approx(opt)
        assert select(_costs_of(t, e, v), t_max, e_max, "dp", grid=(g_t, g_e)).objective_mb == pytest.approx(opt)


_float_instance = st.integers(1, 9).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(0.05, 3.0), min_size=n, max_size=n),
        st.lists(st.floats(1.0, 120.0), min_size=n, max_size=n),
        st.lists(st.floats(100.0, 4000.0), min_size=n, max_size=n),
        st.floats(0.5, 6.0),
        st.floats(10.0, 300.0),
        st.integers(4, 120),
    )
)


@settings(max_examples=80, deadline=None)
@given(_float_instance)
def test_dp_is_feasible_and_within_its_rounding_guarantee(inst):
    """On any costs: feasible, <= the optimum, >= the optimum of budgets shrunk by n cells."""
    t, e, v = (np.array(x) for x in inst[:3])
    t_max, e_max, grid = inst[3], inst[4], inst[5]
    if not solvers.fits_each(t, e, t_max, e_max).any():
        with pytest.raises(InfeasibleError):
            select(_costs_of(t, e, v), t_max, e_max, "dp", grid=grid)
        return
    got = select(_costs_of(t, e, v), t_max, e_max, "dp", grid=grid)
    assert solvers.fits(got.latency_s, got.energy_j, t_max, e_max)
    assert got.selected
    opt = _brute(t, e, v, t_max, e_max)
    assert got.objective_mb <= opt * (1 + 1e-9)
    n = len(t)
    shrunk = _brute(t, e, v, t_max * (1 - n / grid), e_max * (1 - n / grid)) if n < grid else 0.0
    assert got.objective_mb >= shrunk * (1 - 1e-9)


@settings(max_examples=40, deadline=None)
@given(_float_instance, st.sampled_from(STRATEGIES), st.integers(0, 5))
def test_every_strategy_answers_feasibly(inst, strategy, seed):
    t, e, v = (np.array(x) for x in inst[:3])
    t_max, e_max = inst[3], inst[4]
    costs = _costs_of(t, e, v)
    if not solvers.fits_each(t, e, t_max, e_max).any():
        return
    history = {c.id: float(k) for k, c in enumerate(costs)}
    got = select(costs, t_max, e_max, strategy, seed=seed, history=history)
    assert solvers.fits(got.latency_s, got.energy_j, t_max, e_max)
    assert got.selected and len(set(got.selected)) == len(got.selected)
    assert got.objective_mb == pytest.approx(sum(c.size_mb for c in costs if c.id in got.selected))


@settings(max_examples=40, deadline=None)
@given(_float_instance)
def test_dominance_pruning_keeps_an_optimum(inst):
    t, e, v = (np.array(x) for x in inst[:3])
    t_max, e_max = inst[3], inst[4]
    keep = solvers.prune_dominated(t, e, v, t_max, e_max)
    assert _brute(t[keep], e[keep], v[keep], t_max, e_max) == pytest.approx(_brute(t, e, v, t_max, e_max))


def test_dp_matches_exact_on_the_paper_topology(paper):
    topo, costs = paper
    for t_max in (1.0, 2.0, 4.0):
        dp = select(costs, t_max, topo.budgets.e_max_j, "dp")
        ex = select(costs, t_max, topo.budgets.e_max_j, "exact")
        assert dp.objective_mb == pytest.approx(ex.objective_mb)


# --- the small topology's stated property ------------------------------------------------


def test_small_selects_dev01_dev02_and_dev03_absorbs_a_mid_stage_failure(small):
    topo, costs = small
    b = topo.budgets
    sel = select(costs, b.t_max_s, b.e_max_j)
    assert sel.selected == ["dev01", "dev02"]
    by_id = {c.id: c for c in costs}
    spent_t = spent_e = 0.0
    for failed in sel.selected:
        # the device fails halfway through its stage: half its cost is spent and lost
        f = by_id[failed]
        rest_t = b.t_max_s - spent_t - f.latency_s / 2
        rest_e = b.e_max_j - spent_e - f.energy_j / 2
        remaining = [c for c in costs if c.id not in sel.selected[: sel.selected.index(failed) + 1]]
        again = select(remaining, rest_t, rest_e)
        assert "dev03" in again.selected
        assert len(again.selected) == len(sel.selected) - sel.selected.index(failed)
        spent_t += f.latency_s
        spent_e += f.energy_j


# --- baselines, order, fairness ------------------------------------------------------------


def test_random_baseline_is_seeded_and_reproducible(paper):
    topo, costs = paper
    b = topo.budgets
    runs = {seed: select(costs, b.t_max_s, b.e_max_j, "random", seed=seed).selected for seed in range(12)}
    assert all(select(costs, b.t_max_s, b.e_max_j, "random", seed=s).selected == runs[s] for s in (0, 5, 11))
    assert len({tuple(sorted(r)) for r in runs.values()}) > 1
    best = select(costs, b.t_max_s, b.e_max_j, "exact").objective_mb
    assert min(select(costs, b.t_max_s, b.e_max_j, "random", seed=s).objective_mb for s in runs) < best


def test_relay_order_puts_larger_models_first():
    costs = _costs_of(np.array([0.5, 0.4, 0.3, 0.2]), np.array([1.0] * 4), np.array([860.0, 3438.0, 430.0, 3438.0]))
    assert [c.id for c in relay_order(costs)] == ["d03", "d01", "d00", "d02"]
    sel = select(costs, 10.0, 10.0)
    assert sel.selected == ["d03", "d01", "d00", "d02"]


def test_fair_spreads_the_energy_load(paper):
    topo, costs = paper
    b = topo.budgets

    def rounds(strategy: str) -> dict[str, float]:
        spent: dict[str, float] = {}
        for _ in range(12):
            sel = select(costs, b.t_max_s, b.e_max_j, strategy, history=spent)
            for c in sel.chosen:
                spent[c.id] = spent.get(c.id, 0.0) + c.energy_j
        return spent

    dp, fair = rounds("dp"), rounds("fair")
    assert len(fair) > len(dp)  # more devices take part
    assert max(fair.values()) < max(dp.values())  # the busiest device spends less
    assert fair_weights(costs, None).tolist() == [1.0] * len(costs)


def test_fair_is_deterministic_given_its_history_and_follows_it(paper):
    topo, costs = paper
    b = topo.budgets
    fresh = select(costs, b.t_max_s, b.e_max_j, "fair", history={})
    assert fresh.selected == select(costs, b.t_max_s, b.e_max_j, "dp").selected  # nobody spent anything yet
    spent = {c.id: 50.0 for c in fresh.chosen}  # the chain's devices have spent energy
    again = [select(costs, b.t_max_s, b.e_max_j, "fair", history=dict(spent)).selected for _ in range(3)]
    assert again[0] == again[1] == again[2]  # deterministic: the same history, the same chain
    assert again[0] != fresh.selected  # another history, another chain
    assert select(costs, b.t_max_s, b.e_max_j, "dp", history=spent).selected == fresh.selected  # dp ignores it


# --- infeasible budgets ------------------------------------------------------------------


def test_infeasible_budgets_name_the_budget_and_the_shortfall(small):
    _, costs = small
    dev03 = next(c for c in costs if c.id == "dev03")  # the fastest and the most frugal
    with pytest.raises(InfeasibleError, match=rf"T_max 0.3 s is too small by {dev03.latency_s - 0.3:.3g} s.*dev03"):
        select(costs, 0.3, 100.0)
    with pytest.raises(InfeasibleError, match=rf"E_max 10 J is too small by {dev03.energy_j - 10:.3g} J"):
        select(costs, 5.0, 10.0)
    with pytest.raises(InfeasibleError, match="both budgets are too small"):
        select(costs, 0.1, 1.0)
    with pytest.raises(InfeasibleError, match="no candidate devices"):
        select([], 1.0, 1.0)
    with pytest.raises(InfeasibleError, match="E_max -1 leaves no budget"):
        select(costs, 2.0, -1.0)
    with pytest.raises(TopologyError, match="unknown selector"):
        select(costs, 2.0, 70.0, "magic")


def test_no_device_fits_both_budgets_names_the_nearest_miss():
    costs = _costs_of(np.array([1.0, 3.0]), np.array([30.0, 10.0]), np.array([1.0, 1.0]))
    with pytest.raises(InfeasibleError, match=r"no device fits both budgets.*d00.*E_max 20 J is 10 J short"):
        select(costs, 2.0, 20.0)


# --- CLI ---------------------------------------------------------------------------------


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ex:
        main(["select", *args])
    cap = capsys.readouterr()
    return ex.value.code, cap.out, cap.err


def test_cli_json_shape(capsys, topologies):
    code, out, _ = _cli(capsys, str(topologies / "small.yaml"), "--json")
    assert code == 0
    doc = json.loads(out)
    assert set(doc) == {"t_max_s", "e_max_j", "selector", "strategy", "devices", "selected", "objective_mb", "latency_s",
                        "energy_j", "solve_ms", "confidence", "p_within", "predicted_latency_s",
                        "predicted_latency_quantiles_s", "point_latency_s"}
    assert doc["confidence"] is None and set(doc["predicted_latency_quantiles_s"]) == {"p10", "p50", "p90", "p95"}
    assert [d["id"] for d in doc["devices"]] == ["dev01", "dev02", "dev03", "dev04"]
    assert all(set(d) == {"id", "size_mb", "latency_s", "energy_j", "t_down_s", "t_cmp_s", "t_up_s", "latency_mean_s",
                          "latency_quantiles_s", "quantiles_s"} for d in doc["devices"])
    # lossless links: every distribution is the point model's value
    assert all(d["latency_mean_s"] == pytest.approx(d["latency_s"], rel=1e-12)
               and d["latency_quantiles_s"]["p90"] == pytest.approx(d["latency_s"], rel=1e-12) for d in doc["devices"])
    assert doc["predicted_latency_s"] == pytest.approx(doc["latency_s"], rel=1e-12) and doc["p_within"] == 1.0
    assert doc["selected"] == ["dev01", "dev02"] and doc["selector"] == doc["strategy"] == "dp"
    chosen = [d for d in doc["devices"] if d["id"] in doc["selected"]]
    assert doc["latency_s"] == pytest.approx(sum(d["latency_s"] for d in chosen))
    assert doc["objective_mb"] == pytest.approx(sum(d["size_mb"] for d in chosen))
    assert doc["latency_s"] <= doc["t_max_s"] and doc["energy_j"] <= doc["e_max_j"]


@pytest.mark.parametrize("option", ["--selector", "--strategy"])  # --strategy: the older name, kept
def test_cli_options_and_table(capsys, topologies, option):
    code, out, _ = _cli(capsys, str(topologies / "small.yaml"), "--json", "--tmax", "0.5", "--emax", "17",
                        option, "exact")
    doc = json.loads(out)
    assert (code, doc["t_max_s"], doc["e_max_j"], doc["selector"], doc["selected"]) == (0, 0.5, 17.0, "exact",
                                                                                      ["dev03"])
    code, out, _ = _cli(capsys, str(topologies / "small.yaml"))
    assert code == 0 and "dev01 -> dev02" in out and "dev04" in out


def test_cli_infeasible_exits_3(capsys, topologies, small):
    code, out, err = _cli(capsys, str(topologies / "small.yaml"), "--tmax", "0.3", "--json")
    assert code == 3 and out == ""
    short = next(c for c in small[1] if c.id == "dev03").latency_s - 0.3
    assert f"T_max 0.3 s is too small by {short:.3g} s" in err


def test_many_small_devices_keep_the_dp_close_to_the_optimum():
    """When dozens of devices fit, the grid refines itself (cells per item) and the
    local search fills the slack: the DP stays near the optimum, and everyone fits when
    the budgets allow it."""
    rng = np.random.default_rng(3)
    n = 120
    t, e = rng.uniform(0.2, 1.0, n), rng.uniform(5.0, 30.0, n)
    v = rng.choice([430.0, 860.0, 1719.0, 3438.0], n) * rng.uniform(0.9, 1.1, n)
    costs = _costs_of(t, e, v)
    dp, ex = select(costs, 20.0, 600.0, "dp", grid=50), select(costs, 20.0, 600.0, "exact")
    assert len(ex.selected) > 25
    assert solvers.fits(dp.latency_s, dp.energy_j, 20.0, 600.0)
    assert dp.objective_mb >= 0.999 * ex.objective_mb  # 0.991 without the refinement
    assert len(select(costs, float(t.sum()), float(e.sum())).selected) == n
