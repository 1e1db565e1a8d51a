"""Liveness: agents heartbeat (relay/agent.py); one that misses its heartbeats while its
process runs — stopped, hung — is `down` in `testbed status` (the up cell's keeper,
online.Liveness), plans leave it out (generation.current_links), and a run waiting for it
fails over (the orchestrator base: tests/test_relay_protocol.py, the hung-device tests).

Acceptance (issue 25): a SIGSTOPped selected agent is `down` in status within 10 s and the
next run does not select it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.cli.views import status_table
from testbed.composition.online import Liveness, down_agents
from testbed.relay.agent import HEARTBEAT_S, SILENT_AFTER_S

REPO = Path(__file__).resolve().parent.parent
TESTBED = [sys.executable, "-m", "testbed.cli"]


def test_an_agent_is_online_while_its_heartbeats_arrive_then_down_if_its_process_lives():
    live = Liveness()
    assert live.state("dev01", process_alive=True, now=100.0) == "offline"  # never heard: starting
    live.heard("dev01", "online", at=100.0)
    assert live.state("dev01", True, now=100.0 + SILENT_AFTER_S) == "online"
    live.heard("dev01", "computing", at=103.0)  # any status counts as a beat
    assert live.state("dev01", True, now=103.0 + SILENT_AFTER_S - 0.1) == "online"
    silent_at = 103.0 + SILENT_AFTER_S + 0.1
    assert live.state("dev01", True, now=silent_at) == "down"  # stopped, hung: it would hold a run up
    assert live.state("dev01", False, now=silent_at) == "offline"  # gone: started again when a run needs it
    assert live.silent_s("dev01", now=silent_at) == pytest.approx(SILENT_AFTER_S + 0.1)
    live.heard("dev01", "offline", at=silent_at)  # its will: the broker dropped its connection
    assert live.state("dev01", True, now=silent_at) == "down"
    assert HEARTBEAT_S * 3 == SILENT_AFTER_S < 7.5  # down before the broker's keepalive (1.5 x 5 s) fires the will


def test_plans_leave_out_the_agents_the_keeper_calls_down(tmp_path):
    assert down_agents(None) == set() and down_agents(tmp_path) == set()  # no keeper: nothing known
    (tmp_path / "state.json").write_text(json.dumps({"nodes": [
        {"id": "server", "role": "server"}, {"id": "dev01", "role": "device", "agent": "down"},
        {"id": "dev02", "role": "device", "agent": "online"}, {"id": "dev03", "role": "device"}]}))
    assert down_agents(tmp_path) == {"dev01"}
    (tmp_path / "state.json").write_text("{not json")
    assert down_agents(tmp_path) == set()


def test_status_shows_a_down_agent():
    from rich.console import Console

    state = {"run": "r1", "backend": "netns", "nodes": [
        {"id": "dev01", "role": "device", "agent": "down", "agent_online": False, "agent_heard_s_ago": 7.4},
        {"id": "dev02", "role": "device", "agent": "online", "agent_online": True, "agent_heard_s_ago": 0.3},
        {"id": "dev03", "role": "device", "agent_online": False}]}
    console = Console(width=200, record=True)
    console.print(status_table(state))
    text = console.export_text()
    assert "DOWN (silent 7 s)" in text and text.count("online") == 1 and "offline" in text


def _agent_pid(run: str, device: str) -> int:
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith(f"testbed-agent {run} {device} "):
                return int(p)
    raise AssertionError(f"no agent of {device} in run {run}")


def _tb(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*TESTBED, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.root
@pytest.mark.mosquitto
def test_a_stopped_selected_agent_is_down_within_10_s_and_the_next_run_leaves_it_out(topologies, unique_run_id,
                                                                                     tmp_path):
    small = str(topologies / "small.yaml")
    chosen = json.loads(_tb("select", small, "--json").stdout)["selected"]
    victim = chosen[0]  # the DP's choice on the small scenario (dev01, dev02)
    up = _tb("up", small, "--run", unique_run_id, "--json", "--wait")  # (its agents warm behind `up`)
    assert up.returncode == 0, up.stderr
    pid = _agent_pid(unique_run_id, victim)
    try:
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        agent = None
        while time.monotonic() - stopped_at < 15:
            st = _tb("status", "--run", unique_run_id, "--json", timeout=60)
            assert st.returncode == 0, st.stderr
            agent = {n["id"]: n for n in json.loads(st.stdout)["nodes"]}[victim].get("agent")
            if agent == "down":
                break
            time.sleep(0.25)
        down_after_s = time.monotonic() - stopped_at
        print(f"{victim} stopped: down in `testbed status` after {down_after_s:.1f} s")
        assert agent == "down" and down_after_s <= 10.0, (agent, down_after_s)
        assert "DOWN" in _tb("status", "--run", unique_run_id, timeout=60).stdout
        run = _tb("run", small, "--run", unique_run_id, "--json", "--out", str(tmp_path / "next"))
        assert run.returncode == 0, run.stderr[-2000:]
        doc = json.loads(run.stdout)
        assert victim not in doc["selected"] and victim not in doc["relay_order"], doc["selected"]
        assert doc["recovered"] == []  # nobody waited for it
        still = {n["id"]: n for n in json.loads(_tb("status", "--run", unique_run_id, "--json").stdout)["nodes"]}
        assert still[victim]["agent"] == "down" and all(
            n["agent"] == "online" for d, n in still.items() if d != victim and n["role"] == "device")
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        _tb("down", "--run", unique_run_id)
