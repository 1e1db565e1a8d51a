"""A three-node cluster on this machine (root, Docker's binaries): `testbed cluster up`,
the pinned status JSON, a container placed on a worker running the traveling image (no
host mounts; the worker pulls it by digest from the registry on the manager), a node
stopped and started again, and `down` leaving nothing behind. The cluster is made once
for the module and removed at its end, also when a test fails.

Time (this 2-core VM, shared): up without pulls ~20 s once the image is in the store (the
first push of a fresh checkout adds ~60 s); the worker's pull 35-50 s; the module ~2 min.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import docker
import pytest

from testbed.emulation.cluster.daemons import node_client
from testbed.emulation.cluster.datavol import mounted_at
from testbed.emulation.cluster.hostnet import host_chains
from testbed.emulation.cluster.plan import CGROUP_TOP, DATA_ROOT, RUN_ROOT
from testbed.emulation.cluster import cgroup_tree
from testbed.emulation.docker.image import python_bin
from testbed.emulation.nsutil import list_netns
from testbed.emulation.procs import pid_alive

pytestmark = [pytest.mark.root, pytest.mark.docker]

REPO = Path(__file__).resolve().parent.parent
TESTBED = [sys.executable, "-m", "testbed.cli"]


def _tb(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*TESTBED, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _status(name: str) -> dict:
    r = _tb("cluster", "status", "--name", name, "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _leftovers(name: str) -> list[str]:
    found = [f"netns {n}" for n in list_netns(f"tbc-{name}-")]
    found += [f"link {n}" for n in os.listdir("/sys/class/net") if n.startswith(f"tbc{name}-")]
    found += [f"chain {c}" for c in host_chains(f"TBC-{name}")]
    forward = subprocess.run(["iptables", "-w", "10", "-S", "FORWARD"], capture_output=True, text=True).stdout
    found += [f"FORWARD rule {line}" for line in forward.splitlines() if f"TBC-{name}" in line]
    found += [f"cgroup {h}" for h in cgroup_tree.hierarchies() if (h / CGROUP_TOP / name).exists()]
    found += [f"directory {d}" for d in (RUN_ROOT / name, DATA_ROOT / name) if d.exists()]
    found += [f"mount {line.split()[4]}" for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if f"/testbed-cluster/{name}/" in line.split(" - ")[0]]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    found += [f"loop {line}" for line in loops.splitlines() if f"/testbed-cluster/{name}/" in line]
    return found


@pytest.fixture(scope="module")
def cluster():
    """(name, the JSON `cluster up` printed, seconds it took); removed at the end."""
    name = "c" + uuid.uuid4().hex[:5]
    t0 = time.perf_counter()
    try:
        r = _tb("cluster", "up", "--nodes", "3", "--name", name, "--no-pull", "--json", timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        yield name, json.loads(r.stdout), time.perf_counter() - t0
    finally:
        _tb("cluster", "down", "--name", name, timeout=300)


def test_up_and_the_pinned_status_json(cluster) -> None:
    name, up_doc, seconds = cluster
    doc = _status(name)
    nodes = doc["nodes"]
    assert [(n["name"], n["role"], n["state"]) for n in nodes] == \
        [("n1", "manager", "ready"), ("n2", "worker", "ready"), ("n3", "worker", "ready")]
    assert {"name", "role", "state", "address", "pid"} <= set(nodes[0])
    for n in nodes:  # pid: that node's dockerd, in that node's network namespace
        assert pid_alive(n["pid"]) and Path(f"/proc/{n['pid']}/comm").read_text().strip() == "dockerd"
        assert os.stat(f"/proc/{n['pid']}/ns/net").st_ino == os.stat(n["netns"]).st_ino
        assert n["swarm_state"] == "ready"
    assert len({n["address"] for n in nodes}) == 3 and doc["registry"] == f"{nodes[0]['address']}:5000"
    assert up_doc["image"]["ref"].startswith(f"{doc['registry']}/testbed/node@sha256:")
    print(f"\ncluster up --nodes 3 --no-pull: {seconds:.1f} s wall; steps {up_doc['seconds']}")


def test_a_worker_runs_the_traveling_image(cluster) -> None:
    name, up_doc, _ = cluster
    ref = up_doc["image"]["ref"]
    manager = node_client(_plan_node(name, "n1"), timeout_s=300)
    code = ("import torch, diffusers, testbed.relay.agent, testbed.composition.session, socket; "
            "print('traveling', torch.__version__, socket.gethostname())")
    t0 = time.perf_counter()
    svc = manager.services.create(ref, [python_bin(), "-c", code], name=f"probe-{name}",
                                  constraints=["node.labels.testbed.node==n2"],
                                  restart_policy=docker.types.RestartPolicy(condition="none"),
                                  endpoint_spec=docker.types.EndpointSpec(mode="dnsrr"))
    try:
        deadline = time.monotonic() + 240  # the worker pulls ~1.7 GB first
        while True:
            tasks = svc.tasks()
            states = [t["Status"]["State"] for t in tasks]
            if states and states[0] in ("complete", "failed", "rejected", "shutdown"):
                break
            assert time.monotonic() < deadline, f"task still {states} after 240 s"
            time.sleep(1)
        task = tasks[0]
        logs = b"".join(svc.logs(stdout=True, stderr=True)).decode(errors="replace")
        assert task["Status"]["State"] == "complete", (task["Status"], logs[-2000:])
        n2_id = {n.attrs["Description"]["Hostname"]: n.id for n in manager.nodes.list()}[f"{name}-n2"]
        assert task["NodeID"] == n2_id
        assert "traveling 2." in logs, logs
        worker = node_client(_plan_node(name, "n2"))
        containers = worker.containers.list(all=True, filters={"label": f"com.docker.swarm.service.id={svc.id}"})
        assert containers and containers[0].attrs["Mounts"] == []  # nothing of the host is mounted
        assert containers[0].attrs["Config"]["Image"] == ref  # pulled by digest from the manager's registry
        print(f"\nworker n2 pulled and ran the image in {time.perf_counter() - t0:.1f} s")
    finally:
        svc.remove()


def _plan_node(name: str, node: str):
    from testbed.emulation.cluster.cluster import load_plan

    return load_plan(name)[0].node(node)


def _status_now(name: str) -> dict[str, dict]:
    """Status in this process (a CLI call costs seconds of interpreter start on a loaded VM)."""
    from testbed.emulation.cluster.cluster import cluster_status

    return {n["name"]: n for n in asyncio.run(cluster_status(name))["nodes"]}


def test_stop_node_shows_down_and_start_node_rejoins(cluster) -> None:
    name, _, _ = cluster
    before = {n["name"]: n for n in _status(name)["nodes"]}
    r = _tb("cluster", "stop-node", "n3", "--name", name, "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    t0 = time.monotonic()
    assert json.loads(r.stdout)["dockerd_pid"] == before["n3"]["pid"]
    assert not pid_alive(before["n3"]["pid"])
    down = _status_now(name)
    assert down["n3"]["state"] == "down" and down["n3"]["pid"] is None
    assert time.monotonic() - t0 < 5
    assert down["n1"]["state"] == down["n2"]["state"] == "ready"
    while _status_now(name)["n3"]["swarm_state"] != "down":  # the manager's own view follows its heartbeat
        assert time.monotonic() - t0 < 20, "the swarm did not see n3 down within 20 s"
        time.sleep(0.2)
    print(f"\nthe swarm saw n3 down {time.monotonic() - t0:.1f} s after stop-node returned")
    assert _status(name)["nodes"][2]["state"] == "down"  # and the CLI says so
    r = _tb("cluster", "start-node", "n3", "--name", name, "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    again = {n["name"]: n for n in _status(name)["nodes"]}
    assert again["n3"]["state"] == "ready" and again["n3"]["swarm_state"] == "ready"
    assert again["n3"]["pid"] not in (None, before["n3"]["pid"])
    print(f"start-node n3: ready in the swarm {json.loads(r.stdout)['seconds']:.1f} s after its start")


def test_down_leaves_nothing(cluster) -> None:
    name, _, _ = cluster
    pids = [n["pid"] for n in _status(name)["nodes"] if n["pid"] is not None]
    assert _leftovers(name)  # the check sees a cluster that is up
    t0 = time.perf_counter()
    r = _tb("cluster", "down", "--name", name, "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    assert _leftovers(name) == []
    assert not any(pid_alive(p) for p in pids)
    assert not cgroup_tree.pids(f"{CGROUP_TOP}/{name}")
    assert mounted_at(DATA_ROOT / name / "nodes") is None
    print(f"\ncluster down: {time.perf_counter() - t0:.1f} s")
    assert _tb("cluster", "down", "--name", name).returncode == 0  # idempotent
