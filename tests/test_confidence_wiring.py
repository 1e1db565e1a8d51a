"""Issue 23's wiring: plans with and without --confidence, what result.json and the stage
records carry, the stage deadline's tail, re-selection under the plan's confidence, the
connection ledger, the CLI's checks, the sweep's confidence axis, the TUI's P. Pure except
the last test (a root run)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from testbed.cli import main
from testbed.composition.connections import ConnectionLedger, carried
from testbed.errors import InfeasibleError, InputError
from testbed.methods import method
from testbed.methods.base import PlanContext
from testbed.methods.multistage.strategy import Multistage
from testbed.model.radio import compute_links
from testbed.model.topology import load_topology, place
from testbed.relay.orchestrator import Timing
from testbed.selection import device_costs, select
from testbed.selection.chance import latency_draws
from testbed.selection.costs import planning_budgets
from testbed.selection.predictions import StageModel
from testbed.selection.recovery import reselect_chance
from testbed.selection.stochastic import NFQUEUE_PASS_S, pass_cost_s

QUANTILE_KEYS = {"p10", "p50", "p90"}


def _cell(topologies, name: str = "lossy-grid.yaml"):
    topo = load_topology(topologies / name)
    return topo, compute_links(topo, place(topo))


def _plan(topo, links, t_max_s, confidence=None, before=0, path="none", selector="dp"):
    ctx = PlanContext(topo, links, t_max_s, 1000.0, topo.seed, confidence=confidence,
                      messages_before={lk.id: before for lk in links}, delay_path=path)
    return Multistage(selector).plan(ctx)


# --- plans ---------------------------------------------------------------------------------

def test_without_a_confidence_the_plan_is_today_s(topologies):
    topo, links = _cell(topologies)
    plan = _plan(topo, links, 3.0)
    today = select(device_costs(topo, links), *planning_budgets(topo, 3.0, 1000.0), selector="dp", seed=topo.seed)
    assert plan.selected == today.selected and plan.confidence is None
    # lossy links: the mean is E[T(X)] of the distributions, not the point model's T(E[X]);
    # on warm connections far above it
    assert plan.predicted_latency_s != pytest.approx(plan.selection.latency_s, rel=0.01)
    warm = _plan(topo, links, 3.0, before=8)
    assert warm.selected == plan.selected and warm.predicted_latency_s > 1.5 * warm.selection.latency_s
    q = plan.predicted_latency_quantiles_s
    assert set(q) == {"p10", "p50", "p90", "p95"} and q["p10"] < q["p50"] < q["p90"] < q["p95"]
    # the point model fills T_max; the distribution says it is kept far less often than not
    assert plan.selection.latency_s <= 3.0 and plan.p_within < 0.9


def test_lossless_plans_keep_every_prediction_exactly(topologies):
    topo, links = _cell(topologies, "paper.yaml")
    plan = _plan(topo, links, 2.0)
    assert plan.predicted_latency_s == pytest.approx(plan.selection.latency_s, rel=1e-12)
    assert all(v == pytest.approx(plan.selection.latency_s, rel=1e-12)
               for v in plan.predicted_latency_quantiles_s.values())
    for dev in plan.selected:
        cost = next(c for c in plan.costs if c.id == dev)
        pred = plan.stage_predicted(dev)
        assert (pred["t_down_s"], pred["t_up_s"]) == pytest.approx((cost.t_down_s, cost.t_up_s), rel=1e-12)
        assert pred["quantiles_s"]["t_down_s"] == pytest.approx(dict.fromkeys(QUANTILE_KEYS, cost.t_down_s))
    assert plan.p_within == 1.0


def test_with_a_confidence_the_plan_keeps_it(topologies):
    topo, links = _cell(topologies)
    mean, chance = _plan(topo, links, 3.0), _plan(topo, links, 3.0, confidence=0.9)
    assert chance.confidence == 0.9 and chance.p_within >= 0.9 > mean.p_within
    assert len(chance.selected) < len(mean.selected)  # it gives up a stage to keep the budget
    doc = chance.to_json()
    assert doc["confidence"] == 0.9 and doc["p_within"] == chance.p_within
    assert doc["predicted_latency_s"] == chance.predicted_latency_s and doc["point_latency_s"] < 3.0
    assert set(doc["predicted_latency_quantiles_s"]) == {"p10", "p50", "p90", "p95"}


def test_the_connection_s_history_and_the_delayer_enter_the_plan(topologies):
    topo, links = _cell(topologies)
    fresh, warm = _plan(topo, links, 60.0), _plan(topo, links, 60.0, before=8)
    passed = _plan(topo, links, 60.0, path="nfqueue+iptables")
    assert warm.selected == fresh.selected  # a loose budget: every device
    assert warm.predicted_latency_s > 1.5 * fresh.predicted_latency_s  # the carried ssthresh
    assert passed.predicted_latency_s > fresh.predicted_latency_s
    assert passed.to_json()["per_pass_s"] == NFQUEUE_PASS_S == pass_cost_s("nfqueue+iptables")
    assert pass_cost_s("netem") == pass_cost_s("none") == 0.0
    assert warm.to_json()["messages_before"] == {lk.id: 8 for lk in links}


def test_a_stage_record_carries_means_and_quantiles(topologies):
    topo, links = _cell(topologies)
    plan = _plan(topo, links, 60.0, before=3)
    pred = plan.stage_predicted("dev01")
    assert set(pred) == {"t_down_s", "t_cmp_s", "t_up_s", "energy_j", "quantiles_s", "latency_quantiles_s"}
    assert set(pred["quantiles_s"]) == {"t_down_s", "t_up_s"}
    for key in ("t_down_s", "t_up_s"):
        q = pred["quantiles_s"][key]
        assert set(q) == QUANTILE_KEYS and q["p10"] < q["p50"] < q["p90"]
        assert q["p10"] < pred[key] < q["p90"]
    assert set(pred["latency_quantiles_s"]) == QUANTILE_KEYS
    json.dumps(pred)  # what the stage record and the stage_started event carry


def test_the_stage_deadline_waits_for_the_tail(topologies):
    profile = Timing.for_compute("profile", 6)
    assert profile.deadline_s(1.0) == 4.0  # 2 x predicted + 2 s, as before
    assert profile.deadline_s(1.0, tail_s=5.0) == 7.0  # the high quantile + slack, where it is further out
    assert profile.deadline_s(1.0, tail_s=1.5) == 4.0
    topo, links = _cell(topologies)
    plan = _plan(topo, links, 60.0, before=8)
    # 40 ms / 0.5 % on a warm connection: its tail is past twice the point model's stage time
    cost = next(c for c in plan.costs if c.id == "dev05")
    tail = plan.stage_tail_s("dev05")
    assert tail > 2 * cost.latency_s
    assert profile.deadline_s(plan.chain_latency_s(["dev05"]), tail) >= tail + 2.0


# --- re-selection --------------------------------------------------------------------------

def _brute_force(costs, draws, n, t_max, e_max, confidence):
    """The most valuable n devices whose mean latencies and energies fit and whose summed draws keep it."""
    means, best = draws.mean(axis=1), None
    for combo in itertools.combinations(range(len(costs)), n):
        idx = list(combo)
        if means[idx].sum() > t_max or sum(costs[i].energy_j for i in idx) > e_max:
            continue
        if np.mean(draws[idx].sum(axis=0) <= t_max) < confidence:
            continue
        value = sum(costs[i].size_mb for i in idx)
        best = value if best is None or value > best else best
    return best


@pytest.mark.parametrize(("n", "t_left"), [(2, 1.2), (2, 2.0), (3, 2.6), (3, 4.0)])
def test_reselect_chance_is_the_best_chain_that_keeps_it(topologies, n, t_left):
    topo, links = _cell(topologies)
    costs = device_costs(topo, links)
    model = StageModel(topo, links, costs, messages_before={lk.id: 2 for lk in links}, seed=topo.seed)
    draws = latency_draws(model.stages(c.id for c in costs))
    ref = _brute_force(costs, draws, n, t_left, 1000.0, 0.8)
    if ref is None:
        with pytest.raises(InfeasibleError, match="probability 0.8"):
            reselect_chance(costs, draws, n, t_left, 1000.0, 0.8)
        return
    sel, p = reselect_chance(costs, draws, n, t_left, 1000.0, 0.8)
    assert len(sel.selected) == n and p >= 0.8 and sel.objective_mb == pytest.approx(ref)


def test_replan_keeps_the_confidence_where_a_chain_can(topologies):
    topo, links = _cell(topologies)
    plan = _plan(topo, links, 3.0, confidence=0.9)
    replan = plan.replan(3.0, 1000.0)
    pool = [d for d in (lk.id for lk in links) if d not in plan.selected[:1]]
    kept = replan(pool, 2, 2.5, 900.0)
    assert len(kept) == 2 and kept.confidence_kept and kept.p_within >= 0.9
    # too little time left for 0.9: the mean-based chain, and its probability said
    fallback = replan(pool, 2, 1.6, 900.0)
    assert len(fallback) == 2 and fallback.confidence_kept is False and fallback.p_within < 0.9
    mean_plan = _plan(topo, links, 3.0)
    assert mean_plan.replan(3.0, 1000.0)(pool, 2, 2.5, 900.0).confidence_kept  # nothing to keep


# --- the registry and the CLI --------------------------------------------------------------

def test_only_methods_that_can_keep_a_confidence_take_one():
    method("multistage").check_confidence(0.9)
    method("multistage").check_confidence(None)
    for name in ("split", "patch"):
        method(name).check_confidence(None)
        with pytest.raises(InputError, match=rf"--confidence applies to methods that plan under it \(multistage\); "
                                             rf"{name}: "):
            method(name).check_confidence(0.9)
    for bad in (0, 1, 1.5, -0.1, True, float("nan")):
        with pytest.raises(InputError, match="strictly between 0 and 1"):
            method("multistage").check_confidence(bad)


def _exit(capsys, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ("run", "{t}", "--confidence", "1.5"),
    ("run", "{t}", "--confidence", "0"),
    ("run", "{t}", "--method", "split", "--confidence", "0.9"),
    ("run", "{t}", "--run", "nosuch", "--confidence", "-1"),
    ("select", "{t}", "--confidence", "1"),
    ("sweep", "{t}", "--confidence", "none,2"),
    ("sweep", "{t}", "--confidence", "x"),
])
def test_a_bad_confidence_is_exit_2_before_anything_starts(topologies, tmp_path, capsys, argv):
    argv = [a.format(t=topologies / "small-lossy.yaml") for a in argv]
    code, err = _exit(capsys, *argv, *(["--out", str(tmp_path / "o")] if argv[0] != "select" else []))
    assert code == 2 and ("confidence" in err or "between 0 and 1" in err), err
    assert not (tmp_path / "o").exists()


def test_select_with_a_confidence(topologies, capsys):
    code, out_json = 0, None
    with pytest.raises(SystemExit) as e:
        main(["select", str(topologies / "lossy-grid.yaml"), "--tmax", "3", "--confidence", "0.9", "--json"])
    code, out_json = e.value.code, capsys.readouterr().out
    doc = json.loads(out_json)
    assert code == 0 and doc["confidence"] == 0.9 and doc["p_within"] >= 0.9
    assert all("p90" in d["latency_quantiles_s"] for d in doc["devices"])
    with pytest.raises(SystemExit):
        main(["select", str(topologies / "lossy-grid.yaml"), "--tmax", "3"])
    text = capsys.readouterr().out
    assert "p90" in text and "P(within)" in text


# --- the connection ledger ----------------------------------------------------------------

def test_the_ledger_counts_runs_per_agent_connection(tmp_path):
    ledger = ConnectionLedger(tmp_path)
    assert ledger.counts({"dev01": 10}) == {}
    ledger.add(carried([{"device": "dev01"}, {"device": "dev02"}]), {"dev01": 10, "dev02": 20})
    ledger.add(carried([{"device": "dev01"}], [{"device": "dev02", "reason": "deadline"},
                                                 {"device": "dev03", "reason": "offline"}]),
               {"dev01": 10, "dev02": 20, "dev03": 30})
    assert ledger.counts({"dev01": 10, "dev02": 20, "dev03": 30}) == {"dev01": 2, "dev02": 2}
    assert ledger.counts({"dev01": 11, "dev02": 20}) == {"dev02": 2}  # dev01 revived: a new connection
    ledger.add({"dev01": 1}, {"dev01": 11})
    assert ledger.counts({"dev01": 11}) == {"dev01": 1}
    nowhere = ConnectionLedger(None)
    nowhere.add({"dev01": 3}, {"dev01": 1})
    assert nowhere.counts({"dev01": 1}) == {}


# --- the sweep's confidence axis ----------------------------------------------------------

def test_the_sweep_plans_with_each_confidence(tmp_path):
    import asyncio

    from testbed.experiments.confidence import CSV_NAME, expand, parse_confidences, write_confidence_csv
    from testbed.experiments.plots import CONFIDENCE_FIGURE, FIGURES, write_figures
    from testbed.experiments.sweep import SweepConfig, mean_based, parse_runs, read_rows, row_key, run_sweep

    assert parse_confidences("none, 0.9,0.8,0.9") == [None, 0.9, 0.8]
    specs = expand(parse_runs("multistage:dp,split"), [None, 0.9])
    assert [s.key for s in specs] == ["multistage:dp", "multistage:dp@0.9", "split"]
    asked = []

    class Res:
        def __init__(self, t, confidence):
            within = t >= 2.0 if confidence is None else True
            self.doc = {"method": "multistage", "selected": ["dev01"], "stages": [], "ms_ssim": 0.5,
                        "latency_s": (0.9 if within else 1.2) * t, "energy_j": 1.0, "predicted_latency_s": 1.5,
                        "predicted_latency_quantiles_s": {"p10": 1.2, "p50": 1.4, "p90": 1.8, "p95": 2.0},
                        "confidence": confidence, "total_steps": 5,
                        "meta": {"compute": "profile", "plan": {"p_within": 0.95 if confidence else 0.6}}}
            self.image_array = np.full((8, 8), 100, dtype=np.uint8)

        def to_json(self):
            return self.doc

    class Session:
        def __init__(self, topo, run_id, out_dir):
            pass

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return None

        async def run(self, method, *, selector, t_max_s, e_max_j, **planned):
            asked.append((method, planned.get("confidence")))
            return Res(t_max_s, planned.get("confidence"))

    topo = tmp_path / "t.yaml"
    topo.write_text("devices: {count: 3}\n")
    cfg = SweepConfig(file=topo, t_max_s=[1.0, 2.0], e_max_j=[200.0], seeds=[1, 2], runs=specs, out_dir=tmp_path / "o")
    outcome = asyncio.run(run_sweep(cfg, factory=Session))
    assert ("multistage", 0.9) in asked and ("split", None) in asked and ("split", 0.9) not in asked
    rows = read_rows(outcome.csv_path)
    planned = [r for r in rows if r["confidence"] == 0.9]
    assert len(planned) == 4 and all(row_key(r) == "multistage:dp@0.9" and r["p_within"] == 0.95 for r in planned)
    assert len(mean_based(rows)) == 8 and all(r["predicted_latency_p90_s"] == 1.8 for r in rows)
    summary = write_confidence_csv(rows, tmp_path / CSV_NAME)
    by = {(s["run"], s["confidence"]): s for s in summary}
    assert by[("multistage:dp", 0.9)]["share_within"] == 1.0 and by[("multistage:dp", None)]["within_t_max"] == 2
    assert by[("multistage:dp", 0.9)]["p_within_mean"] == pytest.approx(0.95)
    assert (tmp_path / CSV_NAME).read_text().splitlines()[0].startswith("run,confidence,runs,")
    paths = write_figures(outcome.csv_path)
    assert [p.name for p in paths] == [*FIGURES, CONFIDENCE_FIGURE]
    assert paths[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the TUI --------------------------------------------------------------------------------

def test_the_tui_cell_selects_with_a_confidence_and_shows_p90(topologies):
    from tui.state import CellModel, StageView

    topo = load_topology(topologies / "lossy-grid.yaml")
    cell = CellModel(topo)
    cell.select(3.0, 1000.0, "dp", topo.seed)
    mean_p = cell.p_within
    cell.select(3.0, 1000.0, "dp", topo.seed, confidence=0.9)
    assert cell.confidence == 0.9 and cell.p_within >= 0.9 > mean_p
    row = cell.devices["dev01"]
    assert row.t_j_p90_s > row.t_j_s  # a lossy link's p90 beside its mean
    mean, p90 = cell.chain_mean_p90_s
    assert p90 > mean
    stage = StageView(1, "dev01", (0, 1), predicted={"t_down_s": 0.3, "t_cmp_s": 0.1, "t_up_s": 0.3,
                                                     "latency_quantiles_s": {"p10": 0.4, "p50": 0.7, "p90": 1.2}})
    assert stage.predicted_p90_s == 1.2 and stage.predicted_latency_s == pytest.approx(0.7)


async def test_the_tui_p_control(topologies):
    from textual.widgets import Input, Static

    from tui.app import TestbedApp

    app = TestbedApp(load_topology(topologies / "lossy-grid.yaml"))
    async with app.run_test(size=(100, 30)) as pilot:
        await app.costs_ready.wait()
        app.query_one("#tmax", Input).value = "3"
        app.query_one("#confidence", Input).value = "1.5"
        await pilot.press("s")
        await pilot.pause()
        assert "P: a probability strictly between 0 and 1" in str(app.query_one("#summary", Static).render())
        app.query_one("#confidence", Input).value = "0.9"
        await pilot.press("s")
        await pilot.pause()
        line = str(app.query_one("#summary", Static).render())
        assert app.cell.p_within >= 0.9 and "P>=0.9" in line and "p90" in line


# --- a run (root) ---------------------------------------------------------------------------

@pytest.mark.root
@pytest.mark.mosquitto
@pytest.mark.slow
async def test_a_run_records_quantiles_and_its_confidence(topologies, tmp_path, unique_run_id):
    from testbed.composition.cells import MadeCell
    from testbed.composition.session import RunSession

    topo = load_topology(topologies / "lossy-grid.yaml")
    async with RunSession(topo, MadeCell(unique_run_id[:7]), out_dir=tmp_path / "a") as session:
        first = (await session.run("multistage", t_max_s=3.0, confidence=0.9)).doc
        second = (await session.run("multistage", t_max_s=60.0, out_dir=tmp_path / "b")).doc
        with pytest.raises(InputError, match="split"):
            await session.run("split", confidence=0.9)
    assert first["confidence"] == 0.9 and first["meta"]["plan"]["p_within"] >= 0.9
    assert set(first["predicted_latency_quantiles_s"]) == {"p10", "p50", "p90", "p95"}
    assert first["predicted_latency_s"] == first["meta"]["plan"]["predicted_latency_s"]
    for doc in (first, second):
        for stage in doc["stages"]:
            q = stage["predicted"]["quantiles_s"]
            assert set(q) == {"t_down_s", "t_up_s"} and all(set(v) == QUANTILE_KEYS for v in q.values())
            assert stage["predicted"]["t_down_s"] > 0 and "t_cmp_s" in stage["predicted"]
    assert second["confidence"] is None and second["meta"]["delay_path"] in ("netem", "nfqueue+iptables")
    # the first run's devices carried one latent each way on their connections: the second plan knows
    assert second["meta"]["plan"]["messages_before"] == {d: 1 for d in first["relay_order"]}
    written = json.loads((tmp_path / "b" / "result.json").read_text())
    assert written["predicted_latency_quantiles_s"] == second["predicted_latency_quantiles_s"]
