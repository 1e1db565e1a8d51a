"""End to end with `--backend docker`, as root with a running daemon: `testbed run` relays
a generation through agents that run inside device containers (broker inside the server
container), on the small and the paper scenario; nothing is left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.docker, pytest.mark.slow]


def _labelled(run: str) -> list[str]:
    out = []
    for what in (["ps", "-aq"], ["network", "ls", "-q"]):
        out += subprocess.run(["docker", *what, "--filter", f"label=testbed.run={run}"], capture_output=True,
                              text=True, timeout=60, check=True).stdout.split()
    return out


@pytest.mark.parametrize("name", ["small", "paper"])
def test_run_with_docker_backend(topologies: Path, tmp_path: Path, name: str) -> None:
    before = set(_docker_runs())
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "run", str(topologies / f"{name}.yaml"),
                        "--backend", "docker", "--out", str(tmp_path), "--json"],
                       capture_output=True, text=True, timeout=900)
    made = set(_docker_runs()) - before
    for run in made:  # a failed run's leftovers, if any, before asserting
        subprocess.run([sys.executable, "-m", "testbed.cli", "down", "--run", run], capture_output=True, timeout=300)
    assert r.returncode == 0, (r.stderr[-3000:], _agent_logs(tmp_path))
    doc = json.loads(r.stdout)
    assert made == set(), f"the run left containers or networks: {made}"
    assert doc["meta"]["backend"] == "docker"
    assert doc["selected"] and doc["total_steps"] > 0
    assert [s["device"] for s in doc["stages"]] == doc["relay_order"]
    assert all(s["t_down_s"] > 0 and s["t_up_s"] > 0 for s in doc["stages"])
    assert (tmp_path / "image.png").stat().st_size > 0
    # the agents ran inside their containers: their output came back through docker exec
    for dev in doc["selected"]:
        assert "online" in (tmp_path / "logs" / f"agent-{dev}.log").read_text()
    assert _labelled(doc["run"]) == []


def _docker_runs() -> list[str]:
    r = subprocess.run(["docker", "ps", "-a", "--filter", "label=testbed.run", "--format", '{{.Label "testbed.run"}}'],
                       capture_output=True, text=True, timeout=60, check=True)
    return sorted(set(r.stdout.split()))


def _agent_logs(out: Path) -> str:
    logs = sorted((out / "logs").glob("*.log")) if (out / "logs").exists() else []
    return "\n".join(f"--- {p.name}\n{p.read_text()[-600:]}" for p in logs[:4])
