"""`testbed fault` on a cell that `testbed up` keeps alive (root): each fault is read back from
the kernel — the CPU quota, the HTB class rate, the link state, the process, the broker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.emulation.runs import cleanup_run
from test_security import _listening
from waits import wait_until

REPO = Path(__file__).resolve().parent.parent
TESTBED = [sys.executable, "-m", "testbed.cli"]


def _tb(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*TESTBED, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture
def up_run(unique_run_id, topologies):
    run = unique_run_id
    try:
        r = _tb("up", str(topologies / "small.yaml"), "--run", run, "--json")
        assert r.returncode == 0, r.stderr
        yield run, json.loads(r.stdout)
    finally:
        cleanup_run(run)


def _ip(run: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", f"tb-{run}-server", *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.root
def test_fault_command_changes_the_kernel_and_undoes_it(up_run):
    run, state = up_run
    devices = [n["id"] for n in state["nodes"] if n["role"] == "device"]
    assert devices[:3] == ["dev01", "dev02", "dev03"]

    r = _tb("fault", "slow", "dev01", "--run", run, "--value", "0.1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["fault"]["value"] == 0.1
    assert Path(f"/sys/fs/cgroup/cpu/testbed/{run}/dev01/cpu.cfs_quota_us").read_text().strip() == "10000"

    r = _tb("fault", "rate-drop", "dev02", "--run", run, "--value", "0.5")
    assert r.returncode == 0, r.stderr
    classes = subprocess.run(["ip", "netns", "exec", f"tb-{run}-server", "tc", "class", "show", "dev", f"tb{run}br"],
                             capture_output=True, text=True, check=True).stdout
    assert re.search(r"ceil 500Kbit", classes), classes  # dev02's downlink class

    flap = subprocess.Popen([*TESTBED, "fault", "link-flap", "dev01", "--run", run, "--duration", "1.5"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while "state DOWN" not in _ip(run, "link", "show", f"tb{run}d0"):
            assert time.monotonic() < deadline and flap.poll() is None, flap.communicate()
            time.sleep(0.05)
        assert flap.wait(60) == 0
    finally:
        if flap.poll() is None:
            flap.kill()
            flap.wait()
    assert "state DOWN" not in _ip(run, "link", "show", f"tb{run}d0")  # up again

    victim = subprocess.Popen(["ip", "netns", "exec", f"tb-{run}-dev03", "sleep", "300"], start_new_session=True)
    try:
        dev03 = os.stat(f"/run/netns/tb-{run}-dev03").st_ino  # the kill finds it once it is inside the node
        wait_until(lambda: _in_netns(victim.pid, dev03), 30, "the victim to be inside dev03's namespace")
        r = _tb("fault", "kill", "dev03", "--run", run)
        assert r.returncode == 0, r.stderr
        assert victim.wait(10) is not None
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()

    old = state["broker"]["pid"]
    r = _tb("fault", "broker-restart", "--run", run, "--duration", "0.3", "--json")
    assert r.returncode == 0, r.stderr
    assert [e["type"] for e in json.loads(r.stdout)["events"]] == ["fault_injected", "fault_restored"]
    new = json.loads(_tb("status", "--run", run, "--json").stdout)["broker"]["pid"]
    assert new != old
    assert not os.path.exists(f"/proc/{old}") or not Path(f"/proc/{old}/cmdline").read_bytes()  # gone (or a zombie)
    assert sorted(_listening(new)) == [("198.18.0.1", 1883), ("198.18.0.1", 1884)]  # the cell, the watchers


@pytest.mark.root
def test_fault_command_bad_input(up_run):
    run, _ = up_run
    for args, code, needle in ((["explode", "dev01"], 2, "kinds: kill"), (["kill", "dev99"], 2, "unknown device"),
                               (["slow", "dev01", "--value", "-1"], 2, "greater than 0"),
                               (["broker-restart", "dev01"], 2, "takes no device"),
                               (["kill"], 2, "name the device")):
        r = _tb("fault", *args, "--run", run)
        assert r.returncode == code and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


@pytest.mark.root
def test_loss_fault_prints_the_link_and_status_shows_it_then_down_says_what_it_removed(up_run):
    """Delay and loss were visible only in `status --json`: the fault, the status table and
    `down` now say them in words."""
    run, _ = up_run
    r = _tb("fault", "loss", "dev02", "--run", run, "--value", "5")
    assert r.returncode == 0, r.stderr
    assert "dev02's link now:" in r.stdout and "loss 5.00 %" in r.stdout, r.stdout
    r = _tb("fault", "delay", "dev01", "--run", run, "--value", "30", "--duration", "0.5")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("dev01's link now:")]
    assert len(lines) == 2 and "delay 30.0 ms" in lines[0] and "delay 30.0 ms" not in lines[1], r.stdout
    st = _tb("status", "--run", run)
    assert st.returncode == 0, st.stderr
    assert "delay ms" in st.stdout and "loss %" in st.stdout and "emulated" in st.stdout
    dev02 = next(line for line in st.stdout.splitlines() if "dev02" in line)
    assert "5.00" in dev02, st.stdout
    d = _tb("down", "--run", run)
    assert d.returncode == 0, d.stderr
    assert "objects" not in d.stdout and "its supervisor" in d.stdout and "network namespaces" in d.stdout, d.stdout


def _in_netns(pid: int, inode: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == inode
    except OSError:
        return False
