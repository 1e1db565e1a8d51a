"""Sweep plumbing (pure): option parsing, CSV rows and their labels from result documents, figures."""

from __future__ import annotations

import csv
import json

import pytest

from testbed.methods import run_key

from testbed.errors import InfeasibleError, TopologyError
from testbed.experiments.sweep import (
    CSV_COLUMNS,
    RunSpec,
    SweepConfig,
    budget_summary,
    column_labels,
    parse_floats,
    parse_runs,
    read_rows,
    result_row,
    run_sweep,
)
from testbed.experiments.plots import FIGURES, aggregate, write_figures


def test_parse_runs_and_labels():
    specs = parse_runs("multistage:dp, multistage:random,split")
    assert [s.key for s in specs] == ["multistage:dp", "multistage:random", "split"]
    assert [s.label for s in specs] == ["multi-stage w/ DS", "multi-stage w/o DS", "split"]
    for bad in ("multistage", "multistage:bogus", "relay:dp", "split:dp", "split,split", ""):
        with pytest.raises(TopologyError):
            parse_runs(bad)


def test_parse_floats_sorted_unique_positive():
    assert parse_floats("4,1,2,2", "--tmax") == [1.0, 2.0, 4.0]
    for bad in ("1,x", "0", "-1", "nan", ""):
        with pytest.raises(TopologyError) as e:
            parse_floats(bad, "--tmax")
        assert "--tmax" in str(e.value)


DOC = {
    "run": "r1", "method": "multistage", "strategy": "dp", "selected": ["dev02", "dev07"],
    "stages": [
        {"device": "dev02", "steps": [0, 5], "t_down_s": 0.05, "t_cmp_s": 0.5, "t_up_s": 0.04, "overrun_s": 0.0},
        {"device": "dev07", "steps": [5, 10], "t_down_s": 0.06, "t_cmp_s": 0.45, "t_up_s": 0.05, "overrun_s": 0.1},
    ],
    "latency_s": 1.2, "energy_j": 41.0, "predicted_latency_s": 1.15, "ms_ssim": 0.81, "image": None,
}


def test_result_row_takes_the_runs_own_numbers_from_stages():
    doc = {**DOC, "stages": [dict(s, cmp_real_s=0.02) for s in DOC["stages"]], "meta": {"compute": "profile"}}
    row = result_row(doc, RunSpec("multistage", "dp"), 2.0, 200.0, 3, "images/x.png")
    assert list(row) == CSV_COLUMNS
    assert row["selected_count"] == 2 and row["total_steps"] == 10 and row["compute"] == "profile"
    assert row["t_tran_s"] == pytest.approx(0.20) and row["t_cmp_s"] == pytest.approx(0.95)
    assert row["cmp_real_s"] == pytest.approx(0.04)
    assert row["overrun_s"] == pytest.approx(0.1) and row["ms_ssim"] == 0.81 and row["feasible"] == 1


def test_every_column_says_what_it_is():
    from testbed.composition.meta import KINDS

    for compute, t_cmp in (("profile", "emulated"), ("real", "measured")):
        doc = column_labels(compute)
        cols = {c["name"]: c for c in doc["columns"]}
        assert list(cols) == CSV_COLUMNS and set(doc["kinds"]) >= set(KINDS)
        assert all(c["kind"] in doc["kinds"] and c["what"] for c in cols.values())
        assert cols["t_cmp_s"]["kind"] == t_cmp
        assert cols["cmp_real_s"]["kind"] == "measured" and cols["latency_s"]["kind"] == "measured"
        assert cols["energy_j"]["kind"] == "modelled" and cols["predicted_latency_s"]["kind"] == "modelled"
        assert cols["t_max_s"]["kind"] == "setting" and cols["feasible"]["kind"] == "record"


def test_budget_summary_counts_runs_within_their_budgets():
    rows = [
        {"method": "split", "strategy": "best-pair", "t_max_s": 1.0, "e_max_j": 50.0, "feasible": 1,
         "latency_s": 1.04, "energy_j": 20.0},
        {"method": "split", "strategy": "best-pair", "t_max_s": 2.0, "e_max_j": 50.0, "feasible": 1,
         "latency_s": 1.9, "energy_j": 51.0},
        {"method": "split", "strategy": "best-pair", "t_max_s": 0.5, "e_max_j": 50.0, "feasible": 0,
         "latency_s": None, "energy_j": None},
    ]
    assert budget_summary(rows) == {"split": {"runs": 3, "infeasible": 1, "within_t_max": 1, "within_e_max": 1}}


def _rows(points, q):
    """Rows for methods x points; q(key, t, e, seed) -> (ms_ssim or None, t_tran, t_cmp)."""
    rows = []
    for key, (method, strategy) in {"multistage:dp": ("multistage", "dp"),
                                     "multistage:random": ("multistage", "random"),
                                     "split": ("split", "best-pair")}.items():
        for t, e in points:
            for seed in (1, 2):
                quality, tt, tc = q(key, t, e, seed)
                rows.append({"method": method, "strategy": strategy, "t_max_s": t, "e_max_j": e, "seed": seed,
                             "ms_ssim": quality, "feasible": 0 if quality is None else 1, "t_tran_s": tt,
                             "t_cmp_s": tc, "total_steps": 5, "image": None})
    return rows


POINTS = [(t, e) for t in (1.0, 2.0, 4.0) for e in (100.0, 200.0)]


def _paper_like(key, t, e, seed):
    if key == "split":
        return 0.1 * t / 4, 0.8 * t, 0.2 * t
    base = 0.5 + 0.1 * t if key == "multistage:dp" else 0.45 + 0.08 * t
    return min(base, 0.99), 0.3 / t, 0.7


def test_infeasible_runs_count_as_zero_quality():
    def q(key, t, e, seed):
        if key == "split" and t == 1.0:
            return None, 0, 0
        return _paper_like(key, t, e, seed)

    agg = aggregate(_rows(POINTS, q), "t_max_s", "e_max_j", 200.0)
    first = agg["split"][0]
    assert first["x"] == 1.0 and first["mean"] == 0.0 and first["infeasible"] == 2


async def test_sweep_writes_csv_rows_and_figures(tmp_path):
    """run_sweep with a stand-in runner factory: checks the loop, CSV/JSONL writing and figures
    (the real runners are exercised by the root tests)."""
    import numpy as np

    class Res:
        def __init__(self, t, e, seed, key):
            self.doc = {**DOC, "ms_ssim": min(1.0, 0.2 * t), "run": f"{key}-{seed}"}
            self.image_array = np.full((8, 8), int(30 * t), dtype=np.uint8)

        def to_json(self):
            return self.doc

    class FakeSession:
        """Like RunSession: one per seed, any method, strategy and budgets at each run()."""

        opened = 0

        def __init__(self, topo, run_id, out_dir):
            self.topo = topo

        async def __aenter__(self):
            FakeSession.opened += 1
            return self

        async def __aexit__(self, *exc):
            return None

        async def run(self, method, *, selector, t_max_s, e_max_j):
            if t_max_s < 1:
                raise InfeasibleError("T_max too small")
            key = run_key(method, selector)
            return Res(t_max_s, e_max_j, self.topo.seed, key)

    topo_file = tmp_path / "t.yaml"
    topo_file.write_text("devices: {count: 3}\n")
    cfg = SweepConfig(file=topo_file, t_max_s=[0.5, 2.0], e_max_j=[200.0], seeds=[1, 2],
                      runs=parse_runs("multistage:dp,multistage:random,split"), out_dir=tmp_path / "out")
    outcome = await run_sweep(cfg, factory=FakeSession)
    assert FakeSession.opened == 2  # one cell per seed: every method and budget point share it
    rows = read_rows(outcome.csv_path)
    assert len(rows) == cfg.total == 12
    assert [(r["strategy"], r["t_max_s"], r["feasible"]) for r in rows[:6]] == [
        ("dp", 0.5, 0), ("random", 0.5, 0), ("best-pair", 0.5, 0), ("dp", 2.0, 1), ("random", 2.0, 1),
        ("best-pair", 2.0, 1)]
    assert rows[0]["ms_ssim"] is None and rows[3]["ms_ssim"] == pytest.approx(0.4)
    assert rows[4]["run"] == "multistage:random-1"  # the strategy reached the shared session
    assert rows[5]["run"] == "split-1" and rows[5]["method"] == "split"
    assert rows[3]["image"] == "images/multistage-dp_t2_e200_s1.png"
    assert len(outcome.jsonl_path.read_text().splitlines()) == 12
    with open(outcome.csv_path) as f:
        assert next(csv.reader(f)) == CSV_COLUMNS
    labels = json.loads((cfg.out_dir / "columns.json").read_text())
    assert [c["name"] for c in labels["columns"]] == CSV_COLUMNS and labels["compute"] == "profile"
    record = json.loads((cfg.out_dir / "sweep.json").read_text())
    assert record["seeds"] == [1, 2] and record["runs"] == ["multistage:dp", "multistage:random", "split"]
    assert record["budgets"]["split"] == {"runs": 4, "infeasible": 2, "within_t_max": 2, "within_e_max": 2}
    paths = write_figures(outcome.csv_path)
    assert [p.name for p in paths] == list(FIGURES)
    from PIL import Image

    for p in paths:
        assert p.stat().st_size > 5000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        text = Image.open(p).text  # provenance rides in the PNG: the commit and the caption
        assert text["Source"] == str(record["commit"]) and "t_cmp emulated" in text["Description"]
