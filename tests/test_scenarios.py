"""CI scenarios (topologies/scenarios/*.yaml): each is run on the emulation and its `expect:`
block must hold. One kills a device mid-stage (recovery from the checkpoint), one moves the
devices while the relay runs (live rate changes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.experiments.expectations import DERIVED, check_expectations, format_report
from testbed.model.topology import load_topology

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"

SCENARIOS = sorted((TOPOLOGIES / "scenarios").glob("*.yaml"))
# top-level fields of a run's result document (runner.RunResult / split_runner.SplitResult)
RESULT_FIELDS = {"run", "method", "strategy", "selected", "relay_order", "stages", "latency_s", "energy_j",
                 "predicted_latency_s", "predicted_energy_j", "t_max_s", "e_max_j", "total_steps", "ms_ssim",
                 "image", "recovered", "meta", "objective_mb"}


def _kill_target(topo) -> str | None:
    kills = [f for f in topo.faults if f.kind == "kill"]
    assert len(kills) <= 1 and all(f.kind == "kill" for f in topo.faults), "scenario tests inject one kill"
    return kills[0].device if kills else None


def test_scenarios_exist_with_a_failure_and_mobility():
    topos = [load_topology(p) for p in SCENARIOS]
    assert len(topos) >= 3
    assert any(_kill_target(t) for t in topos), "one scenario must kill a device"
    assert any(t.mobility is not None for t in topos), "one scenario must move the devices"
    for p, t in zip(SCENARIOS, topos):
        assert t.expect, f"{p.name} has no expect: block"
        for key in t.expect:
            assert key.split(".")[0] in RESULT_FIELDS | set(DERIVED), f"{p.name}: unknown metric {key!r}"


@pytest.mark.root
@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
async def test_scenario_meets_its_expectations(path, unique_run_id, tmp_path):
    from testbed.composition.cells import MadeCell
    from testbed.composition.session import RunSession

    topo = load_topology(path)
    fail = _kill_target(topo)
    moves = []
    async with RunSession(topo, MadeCell(unique_run_id), out_dir=tmp_path) as r:
        if topo.mobility is not None:
            r.cell.on_update(moves.append)
        res = await r.run()  # the scenario's own faults (`fail=` would move its kill to mid-stage)
    doc = res.to_json()
    failures = check_expectations(topo.expect, doc)
    assert not failures, f"{path.name}:\n{format_report(topo.expect, doc)}"
    if fail is not None:
        assert doc["recovered"][0]["device"] == fail
        assert fail not in [s["device"] for s in doc["stages"]]
    if topo.mobility is not None:
        # the links really moved during the run: several ticks, each changing rates live
        assert len(moves) >= 2
        first, last = moves[0].devices, moves[-1].devices
        assert any(a["rate_up_mbps"] != b["rate_up_mbps"] for a, b in zip(first, last))


@pytest.mark.root
def test_testbed_run_exits_1_with_a_diff_when_an_expectation_fails(tmp_path):
    """E_max 30 J admits one stage: the scenario's `selected_count: {min: 2}` and
    `steps_total: {min: 10}` fail, the others hold; the run itself succeeded."""
    import subprocess
    import sys

    testbed = Path(sys.executable).with_name("testbed")
    r = subprocess.run([str(testbed), "run", str(TOPOLOGIES / "scenarios" / "relay-smoke.yaml"), "--emax", "30",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "2 of 7 expectations failed" in r.stderr
    assert "- selected_count = 1, expected >= 2" in r.stderr and "+ energy_j = " in r.stderr
    assert (tmp_path / "result.json").is_file()
