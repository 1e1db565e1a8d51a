"""Link impairments on a live cell (root): ping RTT and loss from the server's namespace,
the per-device override, a live change, iperf3 goodput under loss vs the cost model, the
netem path where the kernel has it, and nothing left behind — also after kill -9."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scipy import stats

from testbed.emulation.emulation import Emulation, detect_netem
from testbed.emulation.runs import cleanup_run, delayer_pids, known_runs
from testbed.errors import ResourceError
from testbed.model.impairments import Impairment
from testbed.model.topology import parse_topology
from testbed.selection.transfer import loss_limited_rate_bps, rtt_s
from waits import wait_listening, wait_until

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent
CELL = """
name: links
devices:
  list:
    - {id: dev01, position: {x_m: 300, y_m: 250}}
    - {id: dev02, position: {x_m: 200, y_m: 250}, link: {delay_ms: 5, loss_pct: 0}}
radio: {los: los, rate_cap_mbps: %(rate)s}
links: {delay_ms: %(delay)s, loss_pct: %(loss)s}
"""


def cell(delay: float = 20, loss: float = 2, rate: float = 100):
    return parse_topology(CELL % {"delay": delay, "loss": loss, "rate": rate})


def ping(netns: str, address: str, count: int, interval_s: float = 0.005) -> tuple[float, int]:
    """(mean RTT ms, lost) of `ping -U`: user-to-user time, which includes the hold on the
    receiving side's INPUT chain (plain ping timestamps replies before netfilter)."""
    r = subprocess.run(["nsenter", f"--net={netns}", "ping", "-U", "-q", "-c", str(count), "-i", str(interval_s),
                        "-W", "2", address], capture_output=True, text=True, timeout=count * interval_s + 60)
    sent, got = map(int, re.search(r"(\d+) packets transmitted, (\d+) received", r.stdout).groups())
    assert sent == count, r.stdout + r.stderr
    m = re.search(r"= [\d.]+/([\d.]+)/", r.stdout)
    return (float(m.group(1)) if m else float("nan")), sent - got


def _gone(run: str) -> list[str]:
    """What of the run is still there: namespaces, delayers."""
    left = [n for n in os.listdir("/run/netns") if n.startswith(f"tb-{run}-")] if os.path.isdir("/run/netns") else []
    return left + [f"delayer {pid}" for pid in delayer_pids(run)]


@pytest.fixture
def run_id(unique_run_id: str):
    yield unique_run_id
    cleanup_run(unique_run_id)
    assert _gone(unique_run_id) == []


async def test_ping_rtt_loss_and_override_from_the_server(run_id: str) -> None:
    async with Emulation(cell(20, 2), run_id, cgroups=False) as emu:
        st = emu.status()["impairments"]
        assert st["path"] == ("netem" if emu.netem else "nfqueue+iptables")
        assert st["tcp_congestion_control"] == "reno"
        server = emu.nodes["server"].netns
        n = 1000
        rtt, lost = ping(server, emu.nodes["dev01"].address, n)
        assert 36 <= rtt <= 44, f"mean RTT {rtt} ms; configured 2 x 20 ms"
        lo, hi = stats.binom.interval(0.99, n, 1 - 0.98 ** 2)
        assert lo <= lost <= hi, f"{lost} of {n} lost; 99 % interval {lo:g}-{hi:g}"
        # 2 x 5 ms: the user-space delayer adds a fixed 0.5-1.1 ms per pass (the queue's hand-off
        # and wake-up; 10.97-12.26 ms measured at rest), 10-25 % of a 10 ms RTT, 5 % of 40 ms
        rtt2, lost2 = ping(server, emu.nodes["dev02"].address, 200)
        assert 9 <= rtt2 <= 12.5 and lost2 == 0, (rtt2, lost2)
        # live change (what mobility and faults call)
        await emu.set_impairment("dev01", 5.0, 0.0, 0.0)
        rtt3, lost3 = ping(server, emu.nodes["dev01"].address, 200)
        assert 9 <= rtt3 <= 12.5 and lost3 == 0, (rtt3, lost3)
        assert emu.impairments["dev01"].down == Impairment(5.0, 0.0, 0.0)
        assert await emu.verify_shaping() == []
        delayer = st["delayer_pid"]
    assert delayer is None or not Path(f"/proc/{delayer}").exists() or b"testbed-delayer" not in Path(
        f"/proc/{delayer}/cmdline").read_bytes()
    assert _gone(run_id) == []


def _iperf_down_mbps(server_ns: str, dev_ns: str, dev_addr: str, seconds: int) -> float:
    srv = subprocess.Popen(["nsenter", f"--net={dev_ns}", "iperf3", "-s", "-1", "-B", dev_addr, "-p", "5621"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(dev_ns, 5621)
        r = subprocess.run(["nsenter", f"--net={server_ns}", "iperf3", "-c", dev_addr, "-p", "5621", "-t",
                            str(seconds), "-J"], capture_output=True, text=True, timeout=seconds + 30)
        assert r.returncode == 0, r.stdout[-400:]
        return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        srv.kill()
        srv.wait()


async def test_iperf_goodput_under_loss_matches_the_model(run_id: str) -> None:
    async with Emulation(cell(20, 1, rate=50), run_id, cgroups=False) as emu:
        dev, server = emu.nodes["dev01"], emu.nodes["server"]
        measured = _iperf_down_mbps(server.netns, dev.netns, dev.address, 20)
    one = Impairment(20, 0, 1)
    goodput = 50e6 * 0.95
    predicted = min(goodput, loss_limited_rate_bps(0.01, rtt_s(one, one, goodput))) / 1e6
    # Mathis's rate is Reno's steady state under periodic loss; the cell's Linux Reno, with
    # SACK and RACK, recovers random losses faster, and a 20 s flow varies: measured/model was 1.05, 1.20 and 1.26 in three runs at rest, so a
    # symmetric 25 % failed about one CI run in three. What the test guards is that the loss
    # is on the path and limits TCP as modelled: without it iperf3 gets ~47 Mbit/s (13x),
    # with a quarter of it 2x (the rate goes as 1/sqrt(p)). The loss rate itself is counted
    # by the ping test above.
    ratio = measured / predicted
    assert 0.75 <= ratio <= 1.6, f"iperf3 {measured:.2f} Mbit/s, model {predicted:.2f} (x{ratio:.2f})"


async def test_netem_is_used_where_the_kernel_has_it(run_id: str) -> None:
    async with Emulation(cell(20, 1), run_id, cgroups=False) as emu:
        if not await detect_netem(emu.nodes["server"].netns):
            assert emu.impair.path == "nfqueue+iptables"
            pytest.skip("this kernel has no sch_netem: the fallback is used (checked above)")
        assert emu.impair.path == "netem" and emu.impair.delayer is None
        assert await emu.verify_shaping() == []
        rtt, _ = ping(emu.nodes["server"].netns, emu.nodes["dev02"].address, 100)
        assert 9 <= rtt <= 11.5


async def test_an_impairment_that_cannot_be_applied_is_an_error(run_id: str) -> None:
    try:
        async with Emulation(cell(20, 1), run_id, cgroups=False, impair_path="netem") as emu:
            assert emu.netem and emu.impair.path == "netem"
    except ResourceError as e:
        assert "sch_netem" in str(e) and e.exit_code == 4
        assert _gone(run_id) == []
    else:
        pytest.skip("this kernel has sch_netem: nothing is missing (its path was checked above)")


def test_kill_9_of_the_owner_then_down_leaves_nothing(run_id: str, tmp_path: Path) -> None:
    topo = tmp_path / "links.yaml"
    topo.write_text(CELL % {"delay": 10, "loss": 1, "rate": 50})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "up", str(topo), "--run", run_id, "--no-broker", "--json"],
                       capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr
    state = json.loads(r.stdout)
    assert state["impairments"]["path"] in ("netem", "nfqueue+iptables")
    if state["impairments"]["path"] == "nfqueue+iptables":
        assert delayer_pids(run_id) == {state["impairments"]["delayer_pid"]: run_id}
        assert "TB-IMPAIR" in subprocess.run(["nsenter", f"--net=/run/netns/tb-{run_id}-server", "iptables", "-S"],
                                             capture_output=True, text=True).stdout
    os.kill(state["supervisor_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while delayer_pids(run_id) and time.monotonic() < deadline:  # it sees its owner's pipe close
        time.sleep(0.1)
    assert delayer_pids(run_id) == {}
    assert run_id in known_runs()
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "down", "--run", run_id, "--json"],
                       capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr
    assert _gone(run_id) == []


def test_a_stray_delayer_is_found_and_stopped(run_id: str) -> None:
    stray = subprocess.Popen([sys.executable, "-m", "testbed.emulation.delayer", run_id], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while b"testbed-delayer" not in Path(f"/proc/{stray.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline and stray.poll() is None
            time.sleep(0.05)
        assert delayer_pids(run_id) == {stray.pid: run_id}
        assert run_id in known_runs()  # what `down --all` walks
        removed = cleanup_run(run_id)
        assert f"process {stray.pid}" in removed
        assert stray.wait(10) is not None and delayer_pids(run_id) == {}
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()


async def test_mobility_rederives_radio_impairments(run_id: str) -> None:
    import asyncio

    topo = parse_topology("""
name: moving
devices:
  list:
    - {id: dev01, position: {x_m: 10, y_m: 10}}
radio: {los: nlos}
links: {impairments: radio}
mobility: {speed_mps: 60, interval_s: 0.2}
""")
    async with Emulation(topo, run_id, cgroups=False) as emu:
        first = emu.impairments["dev01"]
        assert first.up.delay_ms > 5  # at the cell edge: retransmissions
        seen = {first}
        for _ in range(30):
            await asyncio.sleep(0.2)
            seen.add(emu.impairments["dev01"])
            if len(seen) > 2:
                break
        assert len(seen) > 2, "the radio-derived impairments never changed while the device moved"
        assert emu.status()["impairments"]["devices"]["dev01"] == emu.impairments["dev01"].to_json()


def test_fault_delay_on_an_up_cell_goes_through_its_owner(run_id: str, topologies: Path) -> None:
    """`testbed fault delay DEV --value MS --run ID` on a `testbed up` cell: the supervisor
    applies it (status shows it, ping sees it), and undoes it after --duration."""
    tb = [sys.executable, "-m", "testbed.cli"]
    up = subprocess.run([*tb, "up", str(topologies / "small.yaml"), "--run", run_id, "--no-broker"],
                        capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, up.stderr[-2000:]
    try:
        fault = subprocess.Popen([*tb, "fault", "delay", "dev01", "--value", "30", "--duration", "10", "--run", run_id],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def applied() -> dict | None:  # (the fault's own process may take seconds to start on a busy machine)
            st = json.loads(subprocess.run([*tb, "status", "--run", run_id, "--json"], capture_output=True, text=True,
                                           timeout=60).stdout)
            return st if "dev01" in (st.get("impairments") or {}).get("devices", {}) else None

        st = wait_until(applied, 60, "the delay to be applied", every_s=0.3)
        nodes = {n["id"]: n for n in st["nodes"]}
        assert st["impairments"]["path"] in ("netem", "nfqueue+iptables")
        rtt, lost = ping(nodes["server"]["netns"], nodes["dev01"]["address"], 40, 0.02)
        assert 55 <= rtt <= 75 and lost == 0, rtt  # 2 x 30 ms
        assert fault.wait(timeout=60) == 0, fault.stderr.read()
        rtt, _ = ping(nodes["server"]["netns"], nodes["dev01"]["address"], 40, 0.02)
        assert rtt < 10, rtt  # undone
    finally:
        subprocess.run([*tb, "down", "--run", run_id], capture_output=True, timeout=120)
