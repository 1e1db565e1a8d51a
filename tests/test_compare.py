"""`testbed compare A B` (testbed/experiments/compare.py): two runs, two sweeps, text and
--json. The fixtures under tests/data/compare/ are real outputs made on this machine:
two runs of topologies/small.yaml (`testbed run`: the defaults, and --emax 50, which fits
one stage) and two one-seed sweeps of it (T_max 1, 2 s; multistage:dp and split at E_max
70 J, and multistage:dp and :random at 40 and 70 J)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.errors import InputError
from testbed.experiments.compare import compare_paths, load_side

DATA = Path(__file__).resolve().parent / "data" / "compare"
RUN_A, RUN_B, SWEEP_A, SWEEP_B = (DATA / n for n in ("run-a", "run-b", "sweep-a", "sweep-b"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed.cli", "compare", *args], capture_output=True, text=True,
                          timeout=120)


def _row(cmp, scope: str, name: str):
    return next(r for r in cmp.rows if r.scope == scope and r.name == name)


def test_two_runs_each_number_with_its_kind_delta_and_ratio():
    a, b = (json.loads((d / "result.json").read_text()) for d in (RUN_A, RUN_B))
    cmp = compare_paths(RUN_A, RUN_B)
    assert cmp.what == "runs"
    budget = _row(cmp, "run", "e_max_j")
    assert (budget.kind, budget.a, budget.b, budget.differs) == ("setting", 70.0, 50.0, True)
    lat = _row(cmp, "run", "latency_s")
    assert lat.kind == a["meta"]["labels"]["latency_s"]["kind"] == "measured"
    assert lat.delta == pytest.approx(b["latency_s"] - a["latency_s"])
    assert lat.ratio == pytest.approx(b["latency_s"] / a["latency_s"])
    assert _row(cmp, "run", "energy_j").kind == "modelled"
    assert _row(cmp, "run", "predicted_latency_s").kind == "modelled"
    assert _row(cmp, "run", "t_cmp_s").kind == "emulated"  # compute: profile
    assert _row(cmp, "run", "t_tran_s").a == pytest.approx(sum(s["t_down_s"] + s["t_up_s"] for s in a["stages"]))
    assert _row(cmp, "run", "relay_order").b == " -> ".join(b["relay_order"])
    assert _row(cmp, "stage 1", "t_down_s").a == a["stages"][0]["t_down_s"]
    assert not _row(cmp, "run", "method").differs and not _row(cmp, "stage 1", "device").differs
    assert cmp.only_a == [f"stage 2 ({a['stages'][1]['device']})"] and cmp.only_b == []
    assert {r.name for r in cmp.differences} >= {"e_max_j", "latency_s", "total_steps", "ms_ssim"}


def test_a_run_against_itself_differs_in_nothing():
    cmp = compare_paths(RUN_A / "result.json", RUN_A)
    assert cmp.differences == [] and len(cmp.rows) > 20


def test_two_sweeps_compare_settings_and_means_over_the_points_both_ran():
    cmp = compare_paths(SWEEP_A / "results.csv", SWEEP_B)
    assert cmp.what == "sweeps"
    assert _row(cmp, "sweep", "e_max_j").b == "40, 70" and _row(cmp, "sweep", "runs").differs
    scope = "multistage:dp (mean of 2 runs)"  # T_max 1 and 2 s at E_max 70 J: in both
    rows_a, _, _ = load_side(SWEEP_A)[1]
    rows_b, _, _ = load_side(SWEEP_B)[1]
    common = [(r["t_max_s"], 70.0) for r in rows_a if r["method"] == "multistage" and r["strategy"] == "dp"]

    def mean(rows, col):
        dp = [r[col] for r in rows if r["strategy"] == "dp" and (r["t_max_s"], r["e_max_j"]) in common]
        return sum(dp) / len(common)

    lat = _row(cmp, scope, "latency_s")
    assert lat.kind == "measured" and lat.a == pytest.approx(mean(rows_a, "latency_s"))
    assert lat.b == pytest.approx(mean(rows_b, "latency_s"))
    assert _row(cmp, scope, "energy_j").kind == "modelled" and _row(cmp, scope, "t_cmp_s").kind == "emulated"
    assert _row(cmp, "multistage:dp T_max 2 E_max 70 (1 seed)", "ms_ssim").kind == "measured"
    assert sorted(cmp.only_a) == ["split T_max 1 E_max 70 seed 1", "split T_max 2 E_max 70 seed 1"]
    assert "multistage:random T_max 1 E_max 40 seed 1" in cmp.only_b


def test_sweeps_without_columns_json_take_the_kinds_of_their_compute_mode(tmp_path):
    (tmp_path / "results.csv").write_bytes((SWEEP_A / "results.csv").read_bytes())
    cmp = compare_paths(tmp_path, SWEEP_A)
    assert cmp.differences == [_row(cmp, "sweep", n) for n in ("topology", "t_max_s", "e_max_j", "seeds", "runs",
                                                               "backend", "commit")]
    assert _row(cmp, "split (mean of 2 runs)", "t_cmp_s").kind == "emulated"


@pytest.mark.slow  # (make check leaves it to make test: seconds of CPU)
def test_cli_text_table_and_json_only_json():
    r = _cli(str(RUN_A), str(RUN_B))
    assert r.returncode == 0, r.stderr
    assert "latency_s" in r.stdout and "measured" in r.stdout and "modelled" in r.stdout and "emulated" in r.stdout
    assert "B / A" in r.stdout and "only in A: stage 2" in r.stdout and "(--all lists them)" in r.stdout
    r = _cli(str(RUN_A), str(RUN_B), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # nothing else on stdout
    assert doc["compared"] == "runs" and {"differences", "equal", "only_a", "only_b", "kinds"} <= set(doc)
    lat = next(d for d in doc["differences"] if d["name"] == "latency_s")
    assert lat["kind"] == "measured" and lat["delta"] == pytest.approx(lat["b"] - lat["a"])
    r = _cli(str(SWEEP_A), str(SWEEP_B))
    assert r.returncode == 0 and "multistage:dp (mean of 2 runs)" in r.stdout and "--points" in r.stdout
    assert "T_max 2 E_max 70 (1 seed)" not in r.stdout
    r = _cli(str(SWEEP_A), str(SWEEP_B), "--points")
    assert "multistage:dp T_max 2 E_max 70 (1 seed)" in r.stdout


@pytest.mark.parametrize("a,b,needle", [
    (RUN_A, SWEEP_A, "compare two runs (result.json) or two sweeps"),
    (RUN_A, DATA / "nothing", "no such file or folder"),
    (DATA, RUN_A, "no result.json"),
])
def test_bad_input_is_exit_2_naming_the_path(a, b, needle):
    with pytest.raises(InputError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        compare_paths(a, b)
    r = _cli(str(a), str(b))
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
