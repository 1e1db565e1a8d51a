"""Nothing leaks (root): `kill -9` of a running `testbed run` mid-generation takes its broker,
agent template and agents with it within 5 s (they die with their owner: procs.spawn_in,
composition/template.py); `testbed down` then leaves no namespace, veth, qdisc, cgroup,
container, state directory or process of that run.

`testbed down --all` is `cleanup_run` over `known_runs()`; the test checks that the crashed
run is among the known runs and removes it with `--run ID`, so that concurrent runs of
other tests on the same machine are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.emulation.runs import cleanup_run, known_runs

REPO = Path(__file__).resolve().parent.parent
TESTBED = [sys.executable, "-m", "testbed.cli"]


def _run_processes(run: str, ns_inodes: set[int]) -> list[str]:
    """Processes of the run: in one of its namespaces, in its cgroups, or naming its state dir."""
    found = []
    cg_pids: set[int] = set()
    for h in ("cpu", "memory"):
        d = Path(f"/sys/fs/cgroup/{h}/testbed/{run}")
        if d.is_dir():
            for f in d.rglob("cgroup.procs"):
                cg_pids |= {int(x) for x in f.read_text().split()}
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\x00", b" ").decode(errors="replace").strip()
            ino = os.stat(f"/proc/{p}/ns/net").st_ino
        except OSError:
            continue
        if not cmd:  # kernel threads, zombies
            continue
        if ino in ns_inodes or int(p) in cg_pids or f"/run/testbed/{run}/" in cmd or f"testbed-agent {run} " in cmd:
            found.append(f"{p}: {cmd[:100]}")
    return found


def _leftovers(run: str, ns_inodes: set[int]) -> list[str]:
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found = [f"netns {line.split()[0]}" for line in ns.splitlines() if line.startswith(f"tb-{run}-")]
    found += [f"link {n}" for n in os.listdir("/sys/class/net") if n.startswith(f"tb{run}")]
    qd = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
    found += [f"qdisc {line}" for line in qd.splitlines() if f" dev tb{run}" in line]
    found += [f"cgroup {h}" for h in ("cpu", "memory") if Path(f"/sys/fs/cgroup/{h}/testbed/{run}").exists()]
    found += [f"state {p}" for p in [Path(f"/run/testbed/{run}")] if p.exists()]
    found += [f"process {p}" for p in _run_processes(run, ns_inodes)]
    if shutil.which("docker"):
        r = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=testbed.run={run}"], capture_output=True,
                           text=True, timeout=30)
        found += [f"container {c}" for c in r.stdout.split()] if r.returncode == 0 else []
    return found


def _wait_for(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


@pytest.mark.root
def test_kill_9_of_a_running_testbed_run_takes_its_processes_then_down_leaves_nothing(topologies, tmp_path):
    out = tmp_path / "out"
    log = open(tmp_path / "run.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([*TESTBED, "run", str(topologies / "small.yaml"), "--out", str(out), "--json"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    run = None
    ns_inodes: set[int] = set()
    try:
        def run_id():  # the run's events carry its id; the first one comes once the cell and agents are up
            try:
                lines = (out / "events.jsonl").read_text().splitlines()
            except FileNotFoundError:
                return None
            return json.loads(lines[0])["run"] if lines else None

        run = _wait_for(run_id, 180, f"the run's first event (see {tmp_path / 'run.log'})")
        _wait_for(lambda: '"stage_started"' in (out / "events.jsonl").read_text(), 120,
                  "the generation to start (broker and agents running)")
        ns_inodes = {os.stat(f"/run/netns/{n}").st_ino for n in os.listdir("/run/netns") if n.startswith(f"tb-{run}-")}
        assert len(ns_inodes) == 5  # server + 4 devices
        # the chain's agents are up; the spares start behind them
        _wait_for(lambda: sum("testbed-agent " in x for x in _run_processes(run, ns_inodes)) == 4, 60,
                  "the four agents (the chain's, then the spares)")
        running = _run_processes(run, ns_inodes)
        assert any("mosquitto" in x for x in running) and sum("testbed-agent " in x for x in running) == 4, running
        assert any("agent-template" in x for x in running), running  # (its title: testbed-agent-template)
        assert any("testbed-worker " in x for x in running), running  # the cell's worker, which forked it
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup handler can run
        killed_at = time.monotonic()
        proc.wait(timeout=30)
        # what it started goes with it: no broker, template or agent of the run 5 s later
        while _run_processes(run, ns_inodes) and time.monotonic() - killed_at < 5.0:
            time.sleep(0.1)
        assert _run_processes(run, ns_inodes) == [], "still running 5 s after the owner's kill -9"
        before = _leftovers(run, ns_inodes)
        kinds = {x.split()[0] for x in before}
        assert {"netns", "link", "cgroup", "state"} <= kinds, before  # the kernel objects stay for `testbed down`
        assert run in known_runs()  # so `testbed down --all` finds it
        d = subprocess.run([*TESTBED, "down", "--run", run, "--json"], capture_output=True, text=True, timeout=120,
                           cwd=REPO)
        assert d.returncode == 0, d.stderr
        assert json.loads(d.stdout)["removed"][run], d.stdout
        _wait_for(lambda: _leftovers(run, ns_inodes) == [], 30, "the killed processes to be gone (reaped by init)")
        assert run not in known_runs()
        again = subprocess.run([*TESTBED, "down", "--run", run, "--json"], capture_output=True, text=True,
                               timeout=120, cwd=REPO)
        assert again.returncode == 0 and json.loads(again.stdout)["removed"][run] == []  # idempotent
    finally:
        end_command(proc)
        log.close()
        if run is not None:
            remove_everything_of(run, ns_inodes)


def end_command(proc: subprocess.Popen) -> None:
    """A command a test started in its own session: killed with its group if it still runs."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def remove_everything_of(run: str, ns_inodes: set[int]) -> None:
    """`testbed down` of the run, and any process of it still there (also when the test failed)."""
    cleanup_run(run)
    for p in _run_processes(run, ns_inodes):
        try:
            os.kill(int(p.split(":")[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass
