"""A device reaches nothing on the host and cannot fork without bound (root).

- host firewall (emulation/host_firewall.py): a listener on the host's wildcard address is
  not reachable from a device's namespace through the host link (198.18.255.254); with the
  run's chain removed the same connect reaches it (the test tells the two apart); the
  chain goes with the cell.
- pids limit: every device node of a cell with limits has `pids.max` = DEVICE_PIDS_MAX
  (read back from the kernel), the status says what enforces it; a process in a cgroup
  with a small pids.max cannot fork past it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from testbed.emulation import host_firewall
from testbed.emulation.backend import DEVICE_PIDS_MAX
from testbed.emulation.cgroups import CgroupLimits, detect_cgroups
from testbed.emulation.emulation import Emulation
from testbed.emulation.nsutil import in_netns
from testbed.emulation.procs import spawn_in
from testbed.model.names import HOST_ADDRESS
from testbed.model.topology import load_topology


def test_the_chain_accepts_only_replies_and_hooks_the_run_interface():
    rules = host_firewall.install_rules("r1", "tbr1h").splitlines()
    assert rules == ["*filter", ":TB-r1-IN - [0:0]", "-A TB-r1-IN -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                     "-A TB-r1-IN -j DROP", "-I INPUT 1 -i tbr1h -j TB-r1-IN", "COMMIT"]
    with pytest.raises(Exception, match="not an interface name"):
        host_firewall.install_rules("r1", "tb r1h; -j ACCEPT")


def _connect(port: int) -> int:
    with socket.socket() as s:
        s.settimeout(1.5)
        try:
            return s.connect_ex((HOST_ADDRESS, port))
        except TimeoutError:
            return -1


def _dropped(run: str) -> int:
    """Packets the run's chain has dropped (its DROP rule's counter)."""
    out = subprocess.run(["iptables", "-w", "-L", host_firewall.chain_name(run), "-v", "-x", "-n"],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(line.split()[0]) for line in out.splitlines() if " DROP " in f" {line} ")


@pytest.mark.root
async def test_a_device_cannot_reach_a_host_listener(topologies, unique_run_id):
    """Without the chain, the connect succeeds where this run holds the host's route to the
    cell (the replies go back through its link; otherwise through another run's, so it
    fails either way): then the test compares both; always, the chain's DROP rule counts
    the device's attempt."""
    run = unique_run_id
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", 0))  # the host's wildcard address, as a careless service would
        listener.listen(8)
        port = listener.getsockname()[1]
        async with Emulation(load_topology(topologies / "small.yaml"), run, cgroups=False) as emu:
            assert emu.status()["host_firewall"] == f"TB-{run}-IN" and run in host_firewall.installed_runs()
            dev = emu.nodes["dev01"].netns
            before = _dropped(run)
            blocked = in_netns(dev, lambda: _connect(port))
            dropped = _dropped(run) - before
            holds_route = emu.backend.host_route
            if holds_route:
                await host_firewall.remove(run)
                open_without = in_netns(dev, lambda: _connect(port))
                await host_firewall.install(run, emu.backend.host_ifname)
                assert open_without == 0  # the chain is what stops it
                assert in_netns(dev, lambda: _connect(port)) != 0
    assert blocked != 0 and dropped >= 1, (blocked, dropped)  # the SYN (and its retry) died in the chain
    assert run not in host_firewall.installed_runs()  # gone with the cell


@pytest.mark.root
async def test_every_device_has_a_pids_limit(topologies, unique_run_id):
    cg = detect_cgroups()
    if cg.pids_controller is None:
        pytest.skip("this host has no pids controller (the cell warns about it)")
    async with Emulation(load_topology(topologies / "small.yaml"), unique_run_id) as emu:
        status = emu.status()
        limits = {n: cg.read_limits(unique_run_id, n).pids_max for n in emu.nodes}
    assert status["pids_limit"] == {"per_device": DEVICE_PIDS_MAX, "by": cg.pids_controller}
    assert limits == {"server": None, **{d: DEVICE_PIDS_MAX for d in ("dev01", "dev02", "dev03", "dev04")}}


FORKER = """
import json, os, time
n = 0
try:
    for _ in range(40):
        if os.fork() == 0:
            time.sleep(3)
            os._exit(0)
        n += 1
except OSError as e:
    print(json.dumps({"forked": n, "error": e.errno}), flush=True)
else:
    print(json.dumps({"forked": n, "error": None}), flush=True)
"""


@pytest.mark.root
def test_a_process_cannot_fork_past_its_nodes_pids_max(unique_run_id, tmp_path):
    cg = detect_cgroups()
    if cg.pids_controller is None:
        pytest.skip("this host has no pids controller")
    cg.create(unique_run_id, "dev01", CgroupLimits(None, None, pids_max=8))
    try:
        log = tmp_path / "forker.log"
        proc = spawn_in(None, [sys.executable, "-c", FORKER], None, log, cg.procs_files(unique_run_id, "dev01"))
        proc.wait(30)
        got = json.loads(log.read_text().strip().splitlines()[-1])
    finally:
        cg.remove(unique_run_id)
    assert got["forked"] == 7 and got["error"] == 11, got  # 8 tasks with the forker itself; then EAGAIN
