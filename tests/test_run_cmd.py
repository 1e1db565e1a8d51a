"""`testbed run` argument handling and the progress display (no root needed)."""

from __future__ import annotations

import os

import pytest
from testbed.cli import main
from testbed.cli.commands.run_cmd import _Progress


def _invoke(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(["run", *args])
    return e.value.code, capsys.readouterr().err


def test_unknown_method_is_bad_input(topologies, capsys):
    code, err = _invoke(capsys, str(topologies / "small.yaml"), "--method", "telepathy", "--out", "/nonexistent/x")
    assert code == 2 and "multistage" in err


def test_missing_topology_is_bad_input(tmp_path, capsys):
    code, err = _invoke(capsys, str(tmp_path / "nope.yaml"))
    assert code == 2 and "no such file" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="checks the non-root error")
def test_without_root_the_run_says_so(topologies, tmp_path, capsys):
    code, err = _invoke(capsys, str(topologies / "small.yaml"), "--out", str(tmp_path / "o"))
    assert code == 4 and "root" in err


def test_progress_folds_events_into_stage_rows():
    p = _Progress()
    p.feed({"type": "selection", "device": None, "selected": ["dev01", "dev02"], "predicted_latency_s": 1.5,
            "predicted_energy_j": 60.0})
    p.feed({"type": "stage_started", "device": "dev01", "stage": 0, "steps": [0, 5],
            "predicted": {"t_down_s": 0.01, "t_cmp_s": 1.0, "t_up_s": 0.01, "energy_j": 40.0}})
    p.feed({"type": "downloaded", "device": "dev01", "stage": 0, "steps": [0, 5], "t_down_s": 0.012})
    assert p.rows[(0, "dev01")]["phase"] == "computing" and p.rows[(0, "dev01")]["t_down_s"] == 0.012
    p.feed({"type": "device_offline", "device": "dev01", "stage": 0, "steps": [0, 5]})
    p.feed({"type": "reselected", "device": "dev03", "stage": 0, "steps": [0, 10], "failed": "dev01",
            "chain": ["dev03", "dev02"], "predicted_latency_s": 0.95, "predicted_energy_j": 36.0, "charged_s": 0.5,
            "charged_j": 20.0, "t_left_s": 1.5, "e_left_j": 50.0})
    assert any(line.startswith("reselected after dev01 failed: dev03 -> dev02 for steps [0, 10]") and
               "charged 0.500 s, 20.0 J; left 1.500 s, 50.0 J" in line for line in p.lines)
    p.feed({"type": "recovered", "device": "dev03", "stage": 0, "steps": [0, 5], "failed": "dev01"})
    assert p.rows[(0, "dev01")]["phase"] == "offline" and p.rows[(0, "dev03")]["phase"] == "took over"
    assert any("recovered: dev03" in line for line in p.lines)
    assert p.render().row_count == 2


@pytest.mark.parametrize("name", ["split", "patch"])
def test_methods_without_recovery_take_no_fault_to_recover_from(topologies, capsys, name):
    code, err = _invoke(capsys, str(topologies / "small.yaml"), "--method", name, "--fail", "dev01")
    assert code == 2 and "--fail applies to methods that recover from a lost device (multistage)" in err
    assert f"{name}: " in err  # and why this one does not


@pytest.mark.root
def test_method_split_runs_the_split_baseline(topologies, tmp_path, capsys):
    import json

    with pytest.raises(SystemExit) as e:
        main(["run", str(topologies / "small.yaml"), "--method", "split", "--json", "--out", str(tmp_path / "o")])
    assert e.value.code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["method"] == "split" and len(doc["relay_order"]) == 2
    assert doc["total_steps"] >= 1 and len(doc["stages"]) == doc["total_steps"]
    assert (tmp_path / "o" / "result.json").is_file() and (tmp_path / "o" / "image.png").is_file()
