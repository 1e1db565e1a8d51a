"""Docker backend, as root with a running daemon: containers per node with the profiles'
limits in their cgroups, the cell shaped inside the server container (iperf3 between
containers within 0.90-1.02 of the rate), broker and processes inside the containers,
`testbed up/status/down --backend docker` on the paper scenario, and nothing left behind
but the node image. Every test uses its own run id and removes what it made."""

from __future__ import annotations

import asyncio
import json
import socket
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.emulation import Emulation
from testbed.emulation.backend import DEVICE_PIDS_MAX
from testbed.emulation.runs import cleanup_run
from testbed.model.profiles import load_profiles
from testbed.model.topology import load_topology
from test_host_limits import _dropped

pytestmark = [pytest.mark.root, pytest.mark.docker]

SERVER = "198.18.0.1"


def _docker(*args: str, timeout: float = 60) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=True).stdout


def _images() -> set[str]:
    return set(_docker("images", "-aq", "--no-trunc").split())


def _leftovers(run: str) -> list[str]:
    found = _docker("ps", "-aq", "--filter", f"label=testbed.run={run}").split()
    found += _docker("network", "ls", "-q", "--filter", f"label=testbed.run={run}").split()
    found += [n for n in os.listdir("/sys/class/net") if n.startswith(f"tb{run}")]
    if Path(f"/run/testbed/{run}").exists():
        found.append(f"/run/testbed/{run}")
    return found


@pytest.fixture
def run_id(unique_run_id: str):
    before = _images()
    yield unique_run_id
    cleanup_run(unique_run_id)  # whatever a failing test left
    assert _leftovers(unique_run_id) == []
    node_image = _docker("images", "-q", "--no-trunc", "testbed-node:local").split()
    assert _images() - before <= set(node_image)  # only the node image may have been (re)made


def _container(run: str, node: str) -> dict:
    return json.loads(_docker("inspect", f"tb-{run}-{node}"))[0]


async def _exec_wait(emu: Emulation, node: str, argv: list[str], log: Path, timeout_s: float) -> str:
    """Run argv in the node's container (docker exec) to its end; its output."""
    pid = await emu.spawn(node, argv, None, log)
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.2)  # the output pump catches up
    return log.read_text() if log.exists() else ""


async def _iperf(emu: Emulation, tmp: Path, port: int, reverse: bool) -> float:
    srv = await emu.spawn("server", ["iperf3", "-s", "-1", "-B", SERVER, "-p", str(port)], None, tmp / f"s{port}.log")
    try:
        await asyncio.sleep(0.5)
        argv = ["iperf3", "-c", SERVER, "-p", str(port), "-t", "2", "-O", "0.5", "-J"] + (["-R"] if reverse else [])
        text = await _exec_wait(emu, "dev01", argv, tmp / f"c{port}.log", 30)
    finally:
        if Path(f"/proc/{srv}").exists():
            os.kill(srv, 9)
    return json.loads(text)["end"]["sum_received"]["bits_per_second"] / 1e6


async def test_small_topology_in_containers(topologies: Path, run_id: str, tmp_path: Path) -> None:
    topo = load_topology(topologies / "small.yaml")
    profiles = load_profiles()
    async with Emulation(topo, run_id, backend="docker") as emu:
        names = set(_docker("ps", "--format", "{{.Names}}", "--filter", f"label=testbed.run={run_id}").split())
        assert names == {f"tb-{run_id}-{n}" for n in ["server", "dev01", "dev02", "dev03", "dev04"]}
        status = emu.status()
        assert status["backend"] == "docker"
        for node in status["nodes"]:
            c = _container(run_id, node["id"])
            # the status names each container's network namespace, and it is that container's
            assert node["netns"] == f"/proc/{c['State']['Pid']}/ns/net"
            assert os.stat(node["netns"]).st_ino == os.stat(f"/proc/{c['State']['Pid']}/ns/net").st_ino
            assert c["NetworkSettings"]["Networks"][f"tb-{run_id}"]["IPAddress"] == node["address"]
            # CPU and memory limits from the profile, visible in the container's own cgroup
            prof = profiles[topo.server.profile if node["id"] == "server" else
                            next(d.profile for d in topo.devices.list if d.id == node["id"])]
            cg = emu.backend.cgroup_dir(node["id"], "cpu")
            assert c["Id"] in str(cg)
            assert int((cg / "cpu.cfs_quota_us").read_text()) == round(prof.cpu_cores * 100_000)
            mem = emu.backend.cgroup_dir(node["id"], "memory")
            assert int((mem / "memory.limit_in_bytes").read_text()) == prof.memory_mb * 2**20
            if node["role"] == "device":  # docker's pids_limit: a fork bomb stops in the container
                pids = emu.backend.cgroup_dir(node["id"], "pids") / "pids.max"
                assert pids.read_text().strip() == str(DEVICE_PIDS_MAX)
        assert status["pids_limit"] == {"per_device": DEVICE_PIDS_MAX, "by": "docker pids_limit"}
        # the host firewall on the network's bridge: a device's connect to a host listener dies in the chain
        assert status["host_firewall"] == f"TB-{run_id}-IN"
        with socket.socket() as listener:
            listener.bind(("0.0.0.0", 0))
            listener.listen(4)
            before = _dropped(run_id)
            host_probe = [sys.executable, "-c", "import socket; socket.create_connection(('198.18.255.254', "
                          f"{listener.getsockname()[1]}), 2); print('ok')"]
            assert "ok" not in await _exec_wait(emu, "dev01", host_probe, tmp_path / "host.log", 15)
            assert _dropped(run_id) > before
        assert await emu.verify_shaping() == []  # the shared plan, read back from the server container
        await emu.set_cpu("dev03", 0.05)  # a "slow" fault: docker update --cpus, live
        assert int((emu.backend.cgroup_dir("dev03", "cpu") / "cpu.cfs_quota_us").read_text()) == 5000
        assert emu.nodes["dev03"].cpu_quota_cores == 0.05

        # the broker runs inside the server container (its cgroup), reachable from a device
        broker = await emu.start_broker()
        server_id = _container(run_id, "server")["Id"]
        assert server_id in Path(f"/proc/{broker.pid}/cgroup").read_text()
        probe = [sys.executable, "-c", f"import socket; socket.create_connection(('{SERVER}', 1883), 2); print('ok')"]
        assert "ok" in await _exec_wait(emu, "dev01", probe, tmp_path / "probe1.log", 15)
        await emu.cut_link("dev01")
        assert "ok" not in await _exec_wait(emu, "dev01", probe, tmp_path / "probe2.log", 15)
        await emu.restore_link("dev01")
        for i in range(10):  # a neighbour entry that failed while cut may answer EHOSTUNREACH once
            if "ok" in await _exec_wait(emu, "dev01", probe, tmp_path / f"probe3-{i}.log", 15):
                break
            await asyncio.sleep(0.5)
        else:
            pytest.fail("dev01 did not reach the broker again after restore_link")

        # shaping across a container link: uplink and downlink of dev01 at set rates
        await emu.set_link("dev01", 10.0, 20.0)
        up = await _iperf(emu, tmp_path, 5401, reverse=False)
        down = await _iperf(emu, tmp_path, 5402, reverse=True)
        assert 0.90 <= up / 10.0 <= 1.02, up
        assert 0.90 <= down / 20.0 <= 1.02, down

        # kill ends what was spawned in the container
        pid = await emu.spawn("dev02", ["sleep", "60"], None, tmp_path / "sleep.log")
        dev02 = _container(run_id, "dev02")["Id"]
        assert dev02 in Path(f"/proc/{pid}/cgroup").read_text()
        await emu.kill("dev02")
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]
    assert _leftovers(run_id) == []


def _testbed(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_up_status_down_paper_scenario(topologies: Path, run_id: str) -> None:
    r = _testbed("up", str(topologies / "paper.yaml"), "--backend", "docker", "--run", run_id, "--json")
    assert r.returncode == 0, r.stderr
    try:
        st = _testbed("status", "--run", run_id, "--json")
        assert st.returncode == 0, st.stderr
        doc = json.loads(st.stdout)
        assert doc["backend"] == "docker" and len(doc["nodes"]) == 21
        for node in doc["nodes"]:
            pid = _container(run_id, node["id"])["State"]["Pid"]
            assert node["netns"] == f"/proc/{pid}/ns/net"
    finally:
        d = _testbed("down", "--run", run_id, "--json")
    assert d.returncode == 0, d.stderr
    removed = json.loads(d.stdout)["removed"][run_id]
    assert any(x.startswith("supervisor ") for x in removed)  # it removed its containers on SIGTERM
    assert _leftovers(run_id) == []
    again = _testbed("down", "--run", run_id, "--json")  # idempotent
    assert again.returncode == 0 and json.loads(again.stdout)["removed"][run_id] == []


def test_down_removes_what_a_crashed_run_left(topologies: Path, run_id: str) -> None:
    r = _testbed("up", str(topologies / "small.yaml"), "--backend", "docker", "--run", run_id, "--json")
    assert r.returncode == 0, r.stderr
    sup = json.loads(r.stdout)["supervisor_pid"]
    os.kill(sup, 9)  # a crash: nobody tears the containers down
    for _ in range(100):
        if not Path(f"/proc/{sup}").exists():
            break
        time.sleep(0.05)
    assert len(_docker("ps", "-q", "--filter", f"label=testbed.run={run_id}").split()) == 5
    d = _testbed("down", "--run", run_id, "--json")
    assert d.returncode == 0, d.stderr
    removed = json.loads(d.stdout)["removed"][run_id]
    assert f"network tb-{run_id}" in removed and sum(x.startswith("container ") for x in removed) == 5
    assert _leftovers(run_id) == []


def test_image_build_is_local_tiny_and_idempotent() -> None:
    first = _testbed("image", "build", "--json")
    assert first.returncode == 0, first.stderr
    a = json.loads(first.stdout)
    b = json.loads(_testbed("image", "build", "--json").stdout)
    assert b["built"] is False and b["id"] == a["id"]  # kept: same host layout
    assert a["size_bytes"] < 4096  # a skeleton: the host's files are mounted, not copied
    assert "/usr" in a["mounts"] and "/etc" not in a["mounts"]  # the image's own /etc, not the host's
    labels = _container_labels_of_image(a["image"])
    assert labels["testbed.image"] == "node" and labels["testbed.mounts"].split(",") == a["mounts"]


def _container_labels_of_image(image: str) -> dict:
    return json.loads(_docker("image", "inspect", image))[0]["Config"]["Labels"]


async def test_processes_joined_to_a_container_are_inside_it_and_kill_sweeps_them(run_id: str) -> None:
    """What the agent launcher's template does: a host process joins a container's cgroups
    (every hierarchy) and namespaces (`join`); the container lists it; `pids` (what kill
    stops) holds it but not the container's own processes."""
    from testbed.emulation.backend import NodeSpec
    from testbed.emulation.docker.backend import DockerBackend

    be = DockerBackend(run_id)
    try:
        await be.create([NodeSpec("server", "server", SERVER, -1), NodeSpec("dev01", "device", "198.18.0.10", 0)])
        join = be.join("dev01")
        procs = join.cgroup_procs
        assert len(procs) >= 2 and all(p.endswith("/cgroup.procs") for p in procs)
        ns = [join.netns, *join.extra_ns]
        code = ("import ctypes, os, sys, time\n"
                "libc = ctypes.CDLL(None, use_errno=True)\n"
                "for p in sys.argv[1].split(','):\n    open(p, 'w').write('0')\n"
                "fds = [os.open(p, os.O_RDONLY) for p in sys.argv[2].split(',')]  # before any setns\n"
                "for fd in fds:\n    assert libc.setns(fd, 0) == 0, fd\n"
                "print('joined', flush=True)\ntime.sleep(60)\n")
        proc = subprocess.Popen([sys.executable, "-c", code, ",".join(map(str, procs)), ",".join(ns)],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "joined"
            top = _docker("top", be.container("dev01"), "-o", "pid")
            assert str(proc.pid) in top.split()
            for kind in ("net", "mnt", "uts", "ipc"):
                assert os.stat(f"/proc/{proc.pid}/ns/{kind}").st_ino == \
                    os.stat(f"/proc/{be.container_pid('dev01')}/ns/{kind}").st_ino
            assert proc.pid in be.pids("dev01")
            for pid in be.pids("dev01"):  # what Emulation.kill does with them
                os.kill(pid, 9)
            proc.wait(timeout=10)  # it would sleep 60 s (kill reaps it: no exit status to read)
            assert not Path(f"/proc/{proc.pid}").exists()
            assert _container(run_id, "dev01")["State"]["Running"]  # its own processes were spared
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        await be.destroy()
