"""Patch runs in sweeps and figures: `--runs ...,patch`, a CSV row per run with the run's
own step count (its bands share each step), a fourth curve on Fig. 4a/c and a row in 4d."""

from __future__ import annotations

import pytest

from testbed.errors import TopologyError
from testbed.experiments.sweep import RunSpec, parse_runs, read_rows, result_row
from testbed.methods import method

PATCH_DOC = {
    "run": "r2", "method": "patch", "strategy": "best-bands", "selected": ["dev01", "dev02"], "total_steps": 3,
    "stages": [{"device": d, "band": i, "steps": [s, s + 1], "t_down_s": 0.2, "t_cmp_s": 0.1, "t_up_s": 0.3,
                "cmp_real_s": 0.05, "overrun_s": 0.0} for s in range(3) for i, d in enumerate(("dev01", "dev02"))],
    "latency_s": 2.0, "energy_j": 30.0, "predicted_latency_s": 2.2, "ms_ssim": 0.7, "image": None,
    "meta": {"compute": "profile"},
}


def test_methods_that_pick_their_own_devices_take_no_selector():
    assert method("multistage").own_selector is None
    assert method("split").own_selector == "best-pair" and method("patch").own_selector == "best-bands"
    # and their strategy objects say so themselves (the registry and the class agree)
    for name in ("multistage", "split", "patch"):
        spec = method(name)
        assert spec.make().selector == spec.selector_for(None)
    specs = parse_runs("multistage:dp,split,patch")
    assert [s.key for s in specs] == ["multistage:dp", "split", "patch"]
    assert specs[2] == RunSpec("patch", "best-bands") and specs[2].label == "patch"
    for bad in ("patch:dp", "patch,patch"):
        with pytest.raises(TopologyError):
            parse_runs(bad)


def test_a_patch_row_counts_each_step_once():
    row = result_row(PATCH_DOC, RunSpec("patch", "best-bands"), 4.0, 200.0, 1)
    assert row["method"] == "patch" and row["selected_count"] == 2
    assert row["total_steps"] == 3  # six band records, three steps
    assert row["t_tran_s"] == pytest.approx(6 * 0.5) and row["t_cmp_s"] == pytest.approx(6 * 0.1)


def test_figures_show_four_methods(tmp_path):
    import csv

    from PIL import Image

    from testbed.experiments.plots import FIGURES, aggregate, write_figures
    from testbed.experiments.sweep import CSV_COLUMNS

    rows = []
    (tmp_path / "images").mkdir()
    for method, strategy in (("multistage", "dp"), ("multistage", "random"), ("split", "best-pair"),
                             ("patch", "best-bands")):
        for t in (2.0, 4.0):
            name = f"images/{method}-{strategy}-{t:g}.png"
            Image.new("L", (8, 8), 100).save(tmp_path / name)
            doc = {**PATCH_DOC, "method": method, "strategy": strategy, "ms_ssim": 0.1 * t}
            rows.append(result_row(doc, RunSpec(method, strategy), t, 200.0, 1, name))
    with open(tmp_path / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    agg = aggregate(read_rows(tmp_path / "results.csv"), "t_max_s", "e_max_j", 200.0)
    assert set(agg) == {"multi-stage w/ DS", "multi-stage w/o DS", "split", "patch"}
    assert [p["mean"] for p in agg["patch"]] == pytest.approx([0.2, 0.4])
    paths = write_figures(tmp_path / "results.csv")
    assert [p.name for p in paths] == list(FIGURES) and all(p.is_file() for p in paths)
    assert Image.open(paths[3]).size == (600, 1080)  # Fig. 4d: 2 T_max columns x 4 method rows (plots._images)
