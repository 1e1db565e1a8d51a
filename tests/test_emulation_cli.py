"""`testbed up/status/down` end to end (root): the paper topology's rates measured with
iperf3 between device and server namespaces, crash cleanup, the root check."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.emulation.runs import cleanup_run, known_runs
from waits import wait_listening

REPO = Path(__file__).resolve().parent.parent
TESTBED = [sys.executable, "-m", "testbed.cli"]


def _tb(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*TESTBED, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _leftovers(run: str) -> list[str]:
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found = [line.split()[0] for line in ns.splitlines() if line.startswith(f"tb-{run}-")]
    found += [n for n in os.listdir("/sys/class/net") if n.startswith(f"tb{run}")]
    found += [f"cgroup {h}" for h in ("cpu", "memory") if Path(f"/sys/fs/cgroup/{h}/testbed/{run}").exists()]
    found += [f"state {p}" for p in [Path(f"/run/testbed/{run}")] if p.exists()]
    return found


@pytest.fixture
def run_id(unique_run_id: str):
    yield unique_run_id
    cleanup_run(unique_run_id)
    assert _leftovers(unique_run_id) == []


def _iperf(server_ns: str, dev_ns: str, port: int, reverse: bool) -> float:
    srv = subprocess.Popen(["nsenter", f"--net={server_ns}", "iperf3", "-s", "-1", "-B", "198.18.0.1", "-p", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(server_ns, port)
        r = subprocess.run(["nsenter", f"--net={dev_ns}", "iperf3", "-c", "198.18.0.1", "-p", str(port), "-t", "2",
                            "-O", "0.5", "-J"] + (["-R"] if reverse else []), capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout[-300:]
        return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        srv.kill()
        srv.wait()


@pytest.mark.root
def test_paper_up_iperf_status_down(topologies: Path, run_id: str) -> None:
    r = _tb("up", str(topologies / "paper.yaml"), "--run", run_id, "--json")
    assert r.returncode == 0, r.stderr
    state = json.loads(r.stdout)
    assert state["run"] == run_id and state["netem"] is False
    st = _tb("status", "--run", run_id, "--json")
    assert st.returncode == 0, st.stderr
    doc = json.loads(st.stdout)
    assert {"run", "backend", "netem", "nodes"} <= set(doc)
    nodes = {n["id"]: n for n in doc["nodes"]}
    assert len(nodes) == 21 and nodes["server"]["role"] == "server"
    assert set(nodes["dev01"]) >= {"id", "role", "netns", "address", "rate_up_mbps", "rate_down_mbps", "cpu_quota_cores"}
    # the two slowest devices keep iperf3 within the machine's means (2 shared cores)
    devices = sorted((n for n in doc["nodes"] if n["role"] == "device"), key=lambda n: n["rate_up_mbps"])[:2]
    for i, dev in enumerate(devices):
        up = _iperf(nodes["server"]["netns"], dev["netns"], 5401 + 2 * i, reverse=False)
        down = _iperf(nodes["server"]["netns"], dev["netns"], 5402 + 2 * i, reverse=True)
        assert 0.90 <= up / dev["rate_up_mbps"] <= 1.02, (dev["id"], up, dev["rate_up_mbps"])
        assert 0.90 <= down / dev["rate_down_mbps"] <= 1.02, (dev["id"], down, dev["rate_down_mbps"])
    d = _tb("down", "--run", run_id)
    assert d.returncode == 0, d.stderr
    assert _leftovers(run_id) == []
    again = _tb("down", "--run", run_id)
    assert again.returncode == 0 and "nothing to remove" in again.stdout


@pytest.mark.root
def test_down_cleans_up_after_a_crashed_supervisor(topologies: Path, run_id: str) -> None:
    r = _tb("up", str(topologies / "small.yaml"), "--run", run_id, "--json")
    assert r.returncode == 0, r.stderr
    pid = json.loads(r.stdout)["supervisor_pid"]
    os.kill(pid, signal.SIGKILL)  # a crash: nothing of the run was removed
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.05)
    assert _leftovers(run_id) != []
    assert run_id in known_runs()
    st = _tb("status", "--run", run_id)
    assert st.returncode == 5 and "supervisor is gone" in st.stderr
    d = _tb("down", "--run", run_id)
    assert d.returncode == 0, d.stderr
    assert _leftovers(run_id) == []
    # the broker (mosquitto) the supervisor had started is gone too
    left = subprocess.run(["pgrep", "-f", f"/run/testbed/{run_id}/broker"], capture_output=True, text=True)
    assert left.stdout.strip() == ""


@pytest.mark.root
def test_up_rejects_bad_input_before_making_anything(run_id: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: {count: 0}\n")
    r = _tb("up", str(bad), "--run", run_id)
    assert r.returncode == 2 and "no devices" in r.stderr
    assert _leftovers(run_id) == []
    r = _tb("up", str(REPO / "topologies" / "small.yaml"), "--run", "Bad-Id")
    assert r.returncode == 2 and "--run" in r.stderr and "lowercase" in r.stderr


def test_without_root_up_exits_4(topologies: Path) -> None:
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *TESTBED]
    else:
        cmd = list(TESTBED)
    r = subprocess.run([*cmd, "up", str(topologies / "small.yaml")], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 4, r.stderr
    assert "needs root" in r.stderr
