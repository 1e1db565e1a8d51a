"""`testbed run` argument handling and the progress display (no root needed)."""

from __future__ import annotations

import os

import pytest
from testbed import methods
from testbed.cli import main
from testbed.cli.commands.run_cmd import _Progress, image_note, summary
from testbed.composition.meta import image_size


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
    # (the list also names test plug-ins registered by other test modules in this process)
    assert code == 2 and "--fail applies to methods that recover from a lost device (multistage" in err
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


@pytest.fixture
def no_cell(monkeypatch):
    """A run that got past its checks would make a cell: here that fails the test instead."""
    from testbed.composition.session import RunSession

    async def refuse(self):
        raise AssertionError("the cell came up: the input should have been refused before")

    monkeypatch.setattr(RunSession, "__aenter__", refuse)


@pytest.mark.parametrize("args,code,says", [
    (["--tmax", "-1"], 2, "--tmax -1: a budget is a positive number of s"),
    (["--emax", "0"], 2, "--emax 0: a budget is a positive number of J"),
    (["--tmax", "nan"], 2, "--tmax nan"),
    (["--fail", "dev99"], 2, "--fail 'dev99': paper has no such device"),
    (["--fail", "dev03"], 2, "--fail dev03: not a device the plan selects (selected: dev09, dev18)"),
    (["--method", "split", "--selector", "random"], 2, "--method split picks its own devices"),
    (["--tmax", "0.1"], 3, "raise --tmax"),
    (["--method", "split", "--tmax", "0.05"], 3, ""),
    (["--run-id", "Bad!"], 2, "--run-id: run id 'Bad!'"),
    (["--run-id", "abc", "--run", "abd"], 2, "--run-id abc names a cold run's new cell"),
])
def test_inputs_are_checked_before_the_cell_comes_up(topologies, tmp_path, capsys, no_cell, args, code, says):
    """Issue 26: `--tmax -1` exited 3 and a bad --fail brought 20 devices up first."""
    got, err = _invoke(capsys, str(topologies / "paper.yaml"), *args, "--out", str(tmp_path / "o"))
    assert got == code and says in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_patch_budgets_that_admit_no_step_exit_3_before_the_cell(topologies, tmp_path, capsys, no_cell):
    got, err = _invoke(capsys, str(topologies / "paper.yaml"), "--method", "patch", "--tmax", "1",
                       "--out", str(tmp_path / "o"))
    assert got == 3 and "patch diffusion: not one step fits T_max 1 s" in err


def test_a_cold_run_id_that_is_taken_is_refused(topologies, tmp_path, capsys, no_cell, monkeypatch):
    import testbed.emulation.runs as runs

    monkeypatch.setattr(runs, "RUN_ROOT", tmp_path)
    (tmp_path / "abc").mkdir()
    got, err = _invoke(capsys, str(topologies / "paper.yaml"), "--run-id", "abc", "--out", str(tmp_path / "o"))
    assert got == 4 and "--run-id abc: a run 'abc' exists already" in err


def test_a_cold_run_takes_the_id_it_is_given(topologies, tmp_path, capsys, monkeypatch):
    """`--run-id ID` names the cold run's cell (and out/ID): the id reaches the cell source."""
    from testbed.composition import cells

    seen = []

    def made(run_id=None, **kw):
        seen.append(run_id)
        raise SystemExit(0)  # stop before the cell comes up

    monkeypatch.setattr(cells, "MadeCell", made)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["run", str(topologies / "paper.yaml"), "--run-id", "mine1"])
    assert seen == ["mine1"]


def _fail_events() -> list[dict]:
    """`run --fail dev09` on paper.yaml: dev09 dies in stage 0 of 2 (steps [0, 5]), dev18 takes over."""
    pred = {"t_down_s": 0.01, "t_cmp_s": 0.5, "t_up_s": 0.01, "energy_j": 20.0}
    return [
        {"type": "selection", "device": None, "selected": ["dev09", "dev18"], "predicted_latency_s": 1.48,
         "predicted_energy_j": 56.2},
        {"type": "stage_started", "device": "dev09", "stage": 0, "steps": [0, 5], "predicted": pred},
        {"type": "device_offline", "device": "dev09", "stage": 0, "steps": [0, 5]},
        {"type": "reselected", "device": "dev18", "stage": 0, "steps": [0, 10], "failed": "dev09",
         "chain": ["dev18", "dev03"], "predicted_latency_s": 1.2, "predicted_energy_j": 40.0, "charged_s": 0.4,
         "charged_j": 10.0, "t_left_s": 1.6, "e_left_j": 190.0},
        {"type": "recovered", "device": "dev18", "stage": 0, "steps": [0, 5], "failed": "dev09"},
        {"type": "stage_started", "device": "dev18", "stage": 0, "steps": [0, 5], "predicted": pred},
        {"type": "stage_started", "device": "dev03", "stage": 1, "steps": [5, 10], "predicted": pred},
    ]


def test_a_reselection_shows_the_steps_each_device_computes():
    """Issue 26: the live table showed dev18's steps [0, 10] (the re-selected chain's) where
    result.json had [0, 5]."""
    p = _Progress()
    for ev in _fail_events():
        p.feed(ev)
    assert {k: r["steps"] for k, r in p.rows.items()} == {(0, "dev09"): [0, 5], (0, "dev18"): [0, 5],
                                                           (1, "dev03"): [5, 10]}


def _cells(table, column: str) -> list[str]:
    return list(next(c for c in table.columns if c.header == column)._cells)


def test_pred_t_is_every_time_the_method_predicts():
    """Split's stages predict handling too: the table left it out (1.075 s against 1.302)."""
    p = _Progress()
    p.feed({"type": "split_step", "device": "dev17", "stage": 0, "steps": [0, 1],
            "predicted": {"t_down_s": 0.1, "t_cmp_s": 0.8, "t_up_s": 0.175, "t_handling_s": 0.227,
                          "energy_j": 9.3}})
    assert _cells(p.render(), "pred T s") == ["1.302"]


@pytest.mark.parametrize("compute,kinds", [("profile", "T_down, T_up measured; T_cmp emulated; E, pred, p90 modelled"),
                                           ("real", "T_down, T_cmp, T_up measured; E, pred, p90 modelled")])
def test_the_live_table_says_what_its_numbers_are(compute, kinds):
    assert str(_Progress(compute).render().caption).splitlines()[0] == kinds


def _doc(method: str, order: list[str], steps: int) -> dict:
    return {"run": "r1", "method": method, "relay_order": order, "total_steps": steps, "latency_s": 1.9,
            "predicted_latency_s": 2.0, "energy_j": 20.0, "predicted_energy_j": 19.0, "ms_ssim": 0.4,
            "recovered": []}


def test_the_summary_says_how_the_devices_worked_together():
    """Issue 26: patch's "dev01 -> dev18" read like a chain; "1 steps"."""
    assert "dev01 + dev18 at once, 2 steps" in summary(_doc("patch", ["dev01", "dev18"], 2), methods.method("patch"))
    assert "head dev17, tail dev09, 1 step," in summary(_doc("split", ["dev17", "dev09"], 1), methods.method("split"))
    line = summary(_doc("multistage", ["dev09", "dev18"], 10), methods.method("multistage"))
    assert "dev09 -> dev18, 10 steps" in line and "latency 1.900 s measured" in line and "20.0 J modelled" in line


def test_the_image_says_its_own_size_and_what_resolution_px_is():
    """Issue 26: image.png is 32 x 32 while the metadata says resolution_px: 256."""
    meta = {"resolution_px": 256, **image_size([32, 32, 3], 256)}
    assert meta["image_width_px"] == meta["image_height_px"] == 32
    assert "resolution_px (256) is the SD1.5 resolution" in meta["resolution_note"]
    assert image_note(meta) == "32 x 32 px; times and sizes are SD1.5's at 256 px"
    assert "resolution_note" not in image_size([256, 256, 3], 256)


@pytest.mark.parametrize("name", [m.name for m in methods.methods() if m.strategy.startswith("testbed.methods.")])
def test_a_cold_runs_plan_needs_no_torch(topologies, name):
    """The plan `testbed run` makes before the cell comes up took 25 s for split (SD1.5 built
    on the meta device for its feature sizes) and 5-15 s for patch (the model loaded for its
    exchange points): now no torch or diffusers at all, for every method."""
    import subprocess
    import sys

    code = ("import sys; from testbed.composition.preflight import plan_cold_run; "
            "from testbed.model.topology import load_topology; "
            f"plan = plan_cold_run(load_topology({str(topologies / 'paper.yaml')!r}), {name!r}, None, 4.0, None, None); "
            "print(len(plan.selected), sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    selected, imported = r.stdout.split(" ", 1)
    assert int(selected) >= 2 and imported.strip() == "[]", r.stdout
