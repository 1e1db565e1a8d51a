"""Fairness end to end (root): the cell keeps the energy each device spent (energy.json in
its state directory); five `testbed run --run ID --strategy fair` on one `testbed up` cell of
topologies/small.yaml spread it more evenly than five `--strategy dp` runs on another."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.mosquitto, pytest.mark.slow]


def _tb(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _five_runs(topology: Path, run: str, strategy: str, out: Path) -> tuple[dict[str, float], list[list[str]]]:
    """Per-device energy (J, the run's own accounting) and the chains of five runs on one up cell."""
    up = _tb("up", str(topology), "--run", run)
    assert up.returncode == 0, up.stderr[-2000:]
    spent: dict[str, float] = {}
    chains = []
    try:
        for i in range(5):
            r = _tb("run", str(topology), "--run", run, "--strategy", strategy, "--out", str(out / f"{i}"), "--json")
            assert r.returncode == 0, r.stderr[-2000:]
            doc = json.loads(r.stdout)
            chains.append(doc["selected"])
            for s in doc["stages"]:
                spent[s["device"]] = spent.get(s["device"], 0.0) + s["energy_j"]
        kept = json.loads((Path("/run/testbed") / run / "energy.json").read_text())
        assert kept == pytest.approx(spent, rel=1e-6)  # the cell's history is what the runs spent
    finally:
        down = _tb("down", "--run", run)
    assert down.returncode == 0, down.stderr
    return spent, chains


def test_fair_spreads_energy_over_repeated_runs_on_an_up_cell(topologies: Path, tmp_path: Path,
                                                              unique_run_id: str) -> None:
    small = topologies / "small.yaml"
    devices = 4

    def max_over_mean(spent: dict[str, float]) -> float:
        return max(spent.values()) / (sum(spent.values()) / devices)

    dp, dp_chains = _five_runs(small, unique_run_id, "dp", tmp_path / "dp")
    fair, fair_chains = _five_runs(small, unique_run_id[:5] + "f", "fair", tmp_path / "fair")
    assert all(c == dp_chains[0] for c in dp_chains)  # dp keeps picking the same chain
    assert len({tuple(c) for c in fair_chains}) > 1  # fair moves it as the history grows
    assert max_over_mean(fair) < max_over_mean(dp), (fair, dp)
