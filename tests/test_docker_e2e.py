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


def _tb(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_fault_kill_on_a_docker_cell_then_a_run_uses_the_remaining_devices(topologies: Path, tmp_path: Path,
                                                                           unique_run_id: str) -> None:
    """`testbed up --backend docker`, `testbed fault kill dev01 --run ID`: the status shows
    dev01 killed (its agent offline), and `testbed run --run ID` relays without it."""
    run = unique_run_id
    small = str(topologies / "small.yaml")
    up = _tb("up", small, "--backend", "docker", "--run", run)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        k = _tb("fault", "kill", "dev01", "--run", run, "--json")
        assert k.returncode == 0, k.stderr[-2000:]
        assert json.loads(k.stdout)["fault"]["kind"] == "kill"
        st = _tb("status", "--run", run, "--json")
        nodes = {n["id"]: n for n in json.loads(st.stdout)["nodes"]}
        assert nodes["dev01"]["state"] in ("down", "killed")
        assert [nodes[d]["state"] for d in ("dev02", "dev03", "dev04")] == ["up"] * 3
        r = _tb("run", small, "--run", run, "--out", str(tmp_path), "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        doc = json.loads(r.stdout)
        assert "dev01" not in doc["selected"] and doc["selected"] and doc["meta"]["backend"] == "docker"
        assert doc["recovered"] == []
    finally:
        down = _tb("down", "--run", run)
    assert down.returncode == 0, down.stderr
    assert _labelled(run) == []


async def test_a_device_revived_after_a_kill_fault_runs_in_its_container_under_its_quota(
        topologies: Path, tmp_path: Path, unique_run_id: str) -> None:
    """The one agent launcher revives into the container: the new agent's cgroups are the
    container's, and a busy loop in exactly those cgroups gets the container's CPU quota."""
    import asyncio
    import os
    import time

    from testbed.composition.faults import FaultInjector
    from testbed.composition.cells import MadeCell
    from testbed.composition.session import RunSession
    from testbed.model.topology import load_topology

    topo = load_topology(topologies / "small.yaml")
    async with RunSession(topo, MadeCell(unique_run_id, backend="docker"), out_dir=tmp_path) as s:
        cell = s.cell
        await s.ensure_agents(["dev04"])
        old = s.agents.pids()["dev04"]
        await FaultInjector(cell, s.emit).inject("kill", "dev04")
        assert cell.nodes["dev04"].state == "killed" and _gone(old)
        pid = await s.revive("dev04")
        assert cell.nodes["dev04"].state == "up" and pid != old
        deadline = time.monotonic() + 10  # retitled once it has joined the container's cgroups and namespaces
        while not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(f"testbed-agent {s.run_id} dev04".encode()):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        container_pid = cell.backend.container_pid("dev04")
        assert Path(f"/proc/{pid}/cgroup").read_text() == Path(f"/proc/{container_pid}/cgroup").read_text()
        for kind in ("net", "mnt", "uts"):
            assert os.stat(f"/proc/{pid}/ns/{kind}").st_ino == os.stat(f"/proc/{container_pid}/ns/{kind}").st_ino
        quota = cell.nodes["dev04"].cpu_quota_cores
        assert quota is not None and quota < 1  # a 0.5-core device: the limit is visible below one core
        # a busy loop joined to the revived agent's own cgroups (every hierarchy)
        procs = [str(p) for p in (await cell.join("dev04")).cgroup_procs]
        code = ("import sys, time\nfor p in sys.argv[1:]:\n    open(p, 'w').write('0')\n"
                "t = time.monotonic()\nwhile time.monotonic() - t < 3.0:\n    pass\n"
                "print(time.process_time(), time.monotonic() - t)\n")
        busy = subprocess.run([sys.executable, "-c", code, *procs], capture_output=True, text=True, timeout=60)
        cpu_s, wall_s = map(float, busy.stdout.split())
        # held to its quota (the host has two cores otherwise); the share, not an absolute time
        assert quota * 0.5 < cpu_s / wall_s < quota * 1.25, (cpu_s, wall_s, quota)


def _gone(pid: int, wait_s: float = 5.0) -> bool:
    """The process has exited (gone, or a zombie its parent has not reaped yet)."""
    import time

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.05)
    return False
