"""The `expect:` checker (pure): bounds, derived metrics, dotted paths, readable diff."""

from __future__ import annotations

import math

import pytest

from testbed.errors import EXIT_EXPECTATION, ExpectationFailed
from testbed.experiments.expectations import (
    check_expectations,
    derived_metrics,
    enforce_expectations,
    format_report,
    metric_value,
)
from testbed.model.topology import Bound, parse_topology

RESULT = {
    "run": "r1",
    "method": "multistage",
    "selected": ["dev01", "dev02"],
    "stages": [
        {"device": "dev01", "steps": 5, "t_down_s": 0.1, "t_cmp_s": 0.5, "t_up_s": 0.2, "energy_j": 20.0,
         "overrun_s": 0.0},
        {"device": "dev03", "steps": 5, "t_down_s": 0.1, "t_cmp_s": 1.0, "t_up_s": 0.1, "energy_j": 30.0,
         "overrun_s": 0.25},
    ],
    "latency_s": 2.0,
    "energy_j": 50.0,
    "ms_ssim": 0.72,
    "recovered": True,
    "meta": {"emulation": {"backend": "netns", "setup_s": 3.5}},
}


def test_all_bounds_hold_gives_no_failures():
    expect = {"latency_s": Bound(max=2.5), "ms_ssim": Bound(min=0.6), "recovered": Bound(min=1)}
    assert check_expectations(expect, RESULT) == []


def test_each_violated_bound_is_reported_with_value_and_margin():
    expect = {"latency_s": Bound(max=1.5), "ms_ssim": Bound(min=0.8, max=1.0), "energy_j": Bound(max=60)}
    fails = check_expectations(expect, RESULT)
    assert [f.key for f in fails] == ["latency_s", "ms_ssim"]
    assert fails[0].value == 2.0 and "over by 0.5" in fails[0].message
    assert "under by 0.08" in fails[1].message


def test_derived_metrics_from_stages():
    d = derived_metrics(RESULT)
    assert d["selected_count"] == 2
    assert d["steps_total"] == 10
    assert math.isclose(d["t_tran_s"], 0.5)
    assert math.isclose(d["t_cmp_s"], 1.5)
    assert math.isclose(d["t_tran_share"], 0.25)
    assert math.isclose(d["overrun_s"], 0.25)
    assert d["devices_used"] == 2  # dev01, dev03 (dev02 failed over to dev03)


def test_split_records_count_both_devices():
    split = {"stages": [{"device": "dev01>dev02", "steps": 1, "t_down_s": 0.3, "t_up_s": 0.4, "t_cmp_s": 0.1}] * 3}
    d = derived_metrics(split)
    assert d["devices_used"] == 2 and d["steps_total"] == 3 and d["t_tran_share"] > 0.8


def test_dotted_paths_booleans_and_lists():
    assert metric_value(RESULT, "meta.emulation.setup_s") == (3.5, "")
    assert metric_value(RESULT, "stages.1.t_cmp_s") == (1.0, "")
    assert metric_value(RESULT, "recovered") == (1.0, "")
    v, note = metric_value(RESULT, "selected")
    assert v == 2 and "length" in note
    assert check_expectations({"stages.0.energy_j": {"max": 10}}, RESULT)[0].value == 20.0


def test_absent_metric_fails_and_lists_known_ones():
    fails = check_expectations({"latncy_s": Bound(max=2)}, RESULT)
    assert len(fails) == 1 and fails[0].value is None
    assert "absent" in fails[0].message and "latency_s" in fails[0].message


def test_null_and_nan_values_fail():
    assert check_expectations({"ms_ssim": Bound(min=0)}, {**RESULT, "ms_ssim": None})
    assert check_expectations({"ms_ssim": Bound(min=0)}, {**RESULT, "ms_ssim": float("nan")})


def test_report_marks_passes_and_failures_like_a_diff():
    text = format_report({"latency_s": Bound(max=2.5), "ms_ssim": Bound(min=0.9)}, RESULT)
    lines = text.splitlines()
    assert lines[0].startswith("+ latency_s = 2")
    assert lines[1].startswith("- ms_ssim = 0.72") and "expected >= 0.9" in lines[1]


def test_enforce_raises_expectation_failed_with_exit_code_1():
    enforce_expectations({"latency_s": Bound(max=2.5)}, RESULT)
    with pytest.raises(ExpectationFailed) as e:
        enforce_expectations({"latency_s": Bound(max=1.0)}, RESULT, scenario="demo")
    assert e.value.exit_code == EXIT_EXPECTATION == 1
    assert "scenario 'demo'" in str(e.value) and "- latency_s = 2" in str(e.value)


def test_expect_block_parsed_from_yaml_is_checked():
    topo = parse_topology("devices: {count: 2}\nexpect:\n  latency_s: {max: 2.5}\n  recovered: {min: 1}\n")
    assert check_expectations(topo.expect, RESULT) == []
    assert check_expectations(topo.expect, {**RESULT, "recovered": False})[0].key == "recovered"


def test_relay_step_ranges_count_as_steps():
    doc = {"stages": [{"device": "a", "steps": [0, 5]}, {"device": "b", "steps": [5, 10]}]}
    assert derived_metrics(doc)["steps_total"] == 10


def test_empty_bound_checks_presence_of_any_value():
    doc = {**RESULT, "recovered": [{"device": "dev01", "took_over": "dev03"}]}
    assert check_expectations({"recovered.0.took_over": Bound()}, doc) == []
    fails = check_expectations({"recovered.0.took_over": Bound()}, {**RESULT, "recovered": []})
    assert len(fails) == 1 and "expected present" in fails[0].message
