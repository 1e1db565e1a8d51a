"""A cell across a three-node cluster on this machine (root, Docker's binaries, mosquitto):
`testbed up FILE --backend swarm --cluster NAME`, devices on every node, each method run
on the up cell, a device's clock skewed by 7.5 s and corrected, a device's own shaping and
impairments measured from another node, a worker's daemon killed mid-run (its devices
down, the run recovering or failing by name), the node back, and `down` leaving nothing
on the cluster. One cluster and one cell for the module, removed at its end, also when a
test fails.

Time (this 2-core VM, shared with another suite; the image already in the store): 2.8 min
(170 s), of which `up` 77-80 s: the nodes pulling the image (~1.5 GB) where their
first task needs it and each device's agent importing torch in its own container.
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

import pytest

from testbed.emulation.cluster.daemons import node_client
from testbed.errors import RunFailedError

pytestmark = [pytest.mark.root, pytest.mark.docker, pytest.mark.mosquitto]

REPO = Path(__file__).resolve().parent.parent
TOPOLOGY = REPO / "topologies" / "small.yaml"  # dev01 on n2, dev02 on n3, dev03 on n1, dev04 on n2
TESTBED = [sys.executable, "-m", "testbed.cli"]
SKEWED, SKEW_S = "dev01", 7.5  # the DP's first device under the file's budgets


def _tb(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*TESTBED, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


def _plan(name: str):
    from testbed.emulation.cluster.cluster import load_plan

    return load_plan(name)[0]


def _state(run: str) -> dict:
    return json.loads(Path(f"/run/testbed/{run}/state.json").read_text())


def _on_cluster(name: str, run: str) -> list[str]:
    from testbed.emulation.cluster.swarm_run import swarm_runs

    return swarm_runs(_plan(name)).get(run, [])


@pytest.fixture(scope="module")
def cluster():
    from test_cluster import _leftovers

    name = "s" + uuid.uuid4().hex[:5]
    try:
        r = _tb("cluster", "up", "--nodes", "3", "--name", name, "--no-pull", "--json", timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        yield name
    finally:
        _tb("cluster", "down", "--name", name, timeout=300)
    assert _leftovers(name) == []


@pytest.fixture(scope="module")
def cell(cluster):
    """(run id, the JSON `testbed up` printed); `testbed down` at the end."""
    run = "w" + uuid.uuid4().hex[:5]
    t0 = time.perf_counter()
    try:
        r = _tb("up", str(TOPOLOGY), "--backend", "swarm", "--cluster", cluster, "--run", run, "--json",
                "--timeout", "1200", timeout=1300, env={"TESTBED_SWARM_CLOCK_SKEW": f"{SKEWED}={SKEW_S}"})
        assert r.returncode == 0, r.stderr[-3000:]
        print(f"\ntestbed up --backend swarm: {time.perf_counter() - t0:.1f} s")
        yield run, json.loads(r.stdout)
    finally:
        _tb("down", "--run", run, timeout=300)


def test_devices_on_every_node_and_their_clocks(cluster, cell) -> None:
    run, _ = cell
    r = _tb("status", "--run", run, "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    nodes = {n["id"]: n for n in json.loads(r.stdout)["nodes"]}
    assert {d: n["host"] for d, n in nodes.items()} == {"server": "n1", "dev01": "n2", "dev02": "n3", "dev03": "n1",
                                                        "dev04": "n2"}
    devices = [n for n in nodes.values() if n["role"] == "device"]
    assert all(n["state"] == "up" and n["agent_online"] for n in devices)
    for n in devices:  # one kernel clock here: offsets are the injected skew, within half a round trip
        want = SKEW_S if n["id"] == SKEWED else 0.0
        assert abs(n["clock_offset_s"] - want) <= n["clock_rtt_s"] / 2 + 1e-3, n
    assert len({n["address"] for n in devices}) == 4 and nodes["server"]["address"] == "198.18.0.1"


def _run(run: str, *args: str) -> dict:
    r = _tb("run", str(TOPOLOGY), "--run", run, "--json", *args, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_every_method_on_the_up_cell(cell) -> None:
    run, _ = cell
    doc = _run(run)
    assert SKEWED in doc["relay_order"]
    for s in doc["stages"]:  # t_down and t_up at one clock: the skewed device's are as small as the others'
        assert -0.01 <= s["t_down_s"] < 1.0 and -0.01 <= s["t_up_s"] < 1.0, s
    print(f"\nmultistage: {doc['latency_s']:.3f} s measured, {doc['predicted_latency_s']:.3f} s predicted")
    split = _run(run, "--method", "split", "--tmax", "4")
    assert split["method"] == "split" and split["stages"]
    patch = _run(run, "--method", "patch", "--tmax", "40", "--emax", "2000")
    assert patch["method"] == "patch" and patch["ms_ssim"] > 0


def _exec(cluster: str, node: str, testbed_node: str, argv: list[str], detach: bool = False) -> str:
    """Run `argv` in the container of `testbed_node` (server, dev01...) on cluster node `node`."""
    client = node_client(_plan(cluster).node(node), timeout_s=120)
    (c,) = client.containers.list(filters={"label": f"testbed.node={testbed_node}"})
    res = c.exec_run(argv, detach=detach)
    return "" if detach else res.output.decode(errors="replace")


def test_a_devices_own_link_seen_from_the_server(cluster, cell) -> None:
    run, _ = cell
    assert _tb("fault", "rate-drop", "dev01", "--value", "20", "--run", run).returncode == 0
    got = {}
    for way, flag in (("up", []), ("down", ["-R"])):
        _exec(cluster, "n1", "server", ["iperf3", "-s", "-B", "198.18.0.1", "-1"], detach=True)  # one test each
        time.sleep(1)
        out = _exec(cluster, "n2", "dev01", ["iperf3", "-c", "198.18.0.1", "-t", "4", "-O", "1", "-J", *flag])
        got[way] = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 20e6
    print(f"\niperf3 n2 <-> n1 at 20 Mbit/s: up {got['up']:.3f}, down {got['down']:.3f} of the rate")
    assert 0.90 <= got["up"] <= 1.02 and 0.90 <= got["down"] <= 1.02, got
    assert _tb("fault", "delay", "dev01", "--value", "20", "--run", run).returncode == 0
    ping = _exec(cluster, "n2", "dev01", ["ping", "-U", "-c", "20", "-i", "0.1", "-q", "198.18.0.1"])
    rtt_min = float(ping.split("rtt min/avg/max/mdev = ")[1].split("/")[0])
    print(f"ping -U with 20 ms each way: min {rtt_min:.1f} ms")
    assert 40.0 <= rtt_min <= 60.0, ping  # both directions: the device's INPUT and the server's
    assert _tb("fault", "delay", "dev01", "--value", "0.01", "--run", run).returncode == 0


def test_losing_a_worker_mid_run(cluster, cell) -> None:
    from testbed.composition.remote_run import run_on_up_cell
    from testbed.emulation.cluster.cluster import cluster_stop_node
    from testbed.model.topology import load_topology

    run, _ = cell
    hosts = {n["id"]: n["host"] for n in _state(run)["nodes"]}
    fired: dict = {}

    async def go() -> dict | Exception:
        loop = asyncio.get_running_loop()

        def on_event(ev: dict) -> None:
            if ev.get("type") == "selection":
                chain = ev["selected"]
                later = [d for d in chain[1:] if hosts[d] != "n1"]
                fired["node"] = hosts[later[0]] if later else None
            elif ev.get("type") == "downloaded" and fired.get("node") and "task" not in fired:
                fired["task"] = loop.create_task(cluster_stop_node(cluster, fired["node"]))

        try:
            return await run_on_up_cell(run, load_topology(TOPOLOGY), on_event=on_event)
        except RunFailedError as e:
            return e

    outcome = asyncio.run(go())
    node = fired.get("node")
    assert node is not None, "the chain had no device on a worker after its first"
    t0 = time.monotonic()
    lost = [d for d, h in hosts.items() if h == node]
    while any(n["state"] != "down" for n in _state(run)["nodes"] if n["id"] in lost):
        assert time.monotonic() - t0 < 5.0, f"{lost} not down in status within 5 s"
        time.sleep(0.1)
    print(f"\n{node} stopped mid-run: {lost} down in status; outcome "
          f"{'recovered ' + str(outcome.get('recovered')) if isinstance(outcome, dict) else outcome}")
    if isinstance(outcome, dict):
        assert outcome["recovered"] and not set(outcome["relay_order"][-1:]) & set(lost)
    else:
        assert outcome.exit_code == 5 and any(d in str(outcome) for d in lost), outcome
    r = _tb("cluster", "start-node", node, "--name", cluster, "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 240  # Swarm restarts the tasks; their keepers reconnect
    while any(n["state"] != "up" for n in _state(run)["nodes"] if n["id"] in lost):
        assert time.monotonic() < deadline, f"{lost} not back up after the node returned"
        time.sleep(1)


def test_down_leaves_nothing_on_the_cluster(cluster, cell) -> None:
    run, _ = cell
    assert _on_cluster(cluster, run)  # the check sees the cell
    r = _tb("down", "--run", run, "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    assert _on_cluster(cluster, run) == []
    assert not Path(f"/run/testbed/{run}").exists()
    for n in _plan(cluster).nodes:  # no container of the run on any node
        assert node_client(n).containers.list(all=True, filters={"label": f"testbed.run={run}"}) == []
