"""Adding a method is one module and one registry line: `solo_method.py` (test-only) adds
"solo" and nothing else in the repository names it, yet the registry, the CLI's help, the
sweep's parser — and, with root, the real run owner, `testbed run` and `testbed sweep` —
run it. The device agents serve it because the agent template reads the same registry
(TESTBED_METHODS names the plug-in module for every process of the run)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import solo_method  # noqa: F401 - registers "solo" in this process
from testbed.methods import METHODS, agent_handlers, method

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def plugin_env(monkeypatch) -> dict[str, str]:
    """Every process of a run (this one, the agent template, a CLI subprocess) loads the plug-in."""
    monkeypatch.setenv("TESTBED_METHODS", "solo_method")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    return dict(os.environ)


def test_the_plugin_is_registered_and_nothing_else_names_it():
    spec = method("solo")
    assert "solo" in METHODS and agent_handlers()["solo"] == spec.agent_handler
    assert spec.make().name == "solo" and spec.line("largest-that-fits").label == "solo"
    r = subprocess.run(["git", "-C", str(REPO), "grep", "-l", "solo", "--", "testbed", "tui", "bench"],
                       capture_output=True, text=True)
    assert r.stdout.split() == []  # the package does not know it


def test_the_cli_and_the_sweep_offer_it(plugin_env):
    from testbed.experiments.sweep import parse_runs

    assert [s.key for s in parse_runs("solo,multistage:dp")] == ["solo", "multistage:dp"]
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "run", "--help"], capture_output=True, text=True,
                       env=plugin_env, timeout=60)
    assert r.returncode == 0 and "solo" in r.stdout


@pytest.mark.root
@pytest.mark.mosquitto
async def test_the_run_owner_runs_it(plugin_env, topologies, tmp_path, unique_run_id):
    from testbed.composition.cells import MadeCell
    from testbed.composition.session import RunSession
    from testbed.model.topology import load_topology

    events: list[dict] = []
    topo = load_topology(topologies / "small.yaml")
    async with RunSession(topo, MadeCell(unique_run_id), out_dir=tmp_path, on_event=events.append) as session:
        doc = (await session.run("solo")).to_json()
    plan = doc["meta"]["plan"]
    assert doc["method"] == "solo" and doc["selector"] == "largest-that-fits" and len(doc["selected"]) == 1
    assert doc["total_steps"] == plan["stages"] * topo.workload.steps_per_stage
    assert [s["device"] for s in doc["stages"]] == doc["selected"] and doc["latency_s"] > 0
    assert {e["method"] for e in events if e["type"] in ("stage_started", "uploaded")} == {"solo"}
    assert json.loads((tmp_path / "result.json").read_text())["method"] == "solo"


@pytest.mark.root
@pytest.mark.mosquitto
def test_testbed_run_and_sweep_run_it(plugin_env, topologies, tmp_path, unique_run_id):
    run = subprocess.run([sys.executable, "-m", "testbed.cli", "run", str(topologies / "small.yaml"), "--method",
                          "solo", "--json", "--out", str(tmp_path / "run")], capture_output=True, text=True,
                         env=plugin_env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["method"] == "solo"
    sweep = subprocess.run([sys.executable, "-m", "testbed.cli", "sweep", str(topologies / "small.yaml"), "--runs",
                            "solo,multistage:dp", "--tmax", "2", "--emax", "200", "--seeds", "1", "--no-figures",
                            "--json", "--out", str(tmp_path / "sweep")], capture_output=True, text=True,
                           env=plugin_env, timeout=600, cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    with open(tmp_path / "sweep" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["method"] for r in rows) == ["multistage", "solo"]
    solo = next(r for r in rows if r["method"] == "solo")
    assert solo["feasible"] == "1" and solo["selector"] == "largest-that-fits" and solo["ms_ssim"]
