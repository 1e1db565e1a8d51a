"""`testbed compose` files, as root with a running daemon: docker-compose v1 accepts the
file, a device container shapes its own link exactly as planned, the small scenario runs a
generation with `docker-compose up`, and the same file runs it on a single-node Swarm
(`docker stack deploy`). Each test removes its containers, networks and stack; the swarm
test leaves the swarm again if it made it."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from testbed.emulation.docker.compose import COMPOSE_CAPS
from testbed.emulation.docker.image import IMAGE, build_image, docker_client, host_mounts
from testbed.emulation.node_uids import deployment_uids
from testbed.emulation.docker.selfshape import plan_self
from testbed.emulation.nsutil import open_iproute
from testbed.emulation.shaping import diff_plan, read_back

pytestmark = [pytest.mark.root, pytest.mark.docker]

DOCKER = shutil.which("docker", path="/usr/bin") or "docker"  # the daemon's own client where both exist


def _sh(*argv: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=check)


def _labelled(run: str) -> list[str]:
    out = _sh(DOCKER, "ps", "-aq", "--filter", f"label=testbed.run={run}").stdout.split()
    return out + _sh(DOCKER, "network", "ls", "-q", "--filter", f"label=testbed.run={run}").stdout.split()


@pytest.fixture
def scenario(topologies: Path, tmp_path: Path, unique_run_id: str):
    r = _sh(sys.executable, "-m", "testbed.cli", "compose", str(topologies / "small.yaml"), "--out-dir", str(tmp_path),
            "--run", unique_run_id, "--json")
    doc = json.loads(r.stdout)
    yield doc
    for c in _sh(DOCKER, "ps", "-aq", "--filter", f"label=testbed.run={unique_run_id}").stdout.split():
        _sh(DOCKER, "rm", "-f", c, check=False)
    for n in _sh(DOCKER, "network", "ls", "-q", "--filter", f"label=testbed.run={unique_run_id}").stdout.split():
        _sh(DOCKER, "network", "rm", n, check=False)
    assert _labelled(unique_run_id) == []


def test_compose_file_is_valid_for_docker_compose_v1(scenario: dict) -> None:
    r = _sh("docker-compose", "-f", scenario["compose_file"], "config", check=False)
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(r.stdout)
    assert set(doc["services"]) == {"server", "dev01", "dev02", "dev03", "dev04"}
    assert doc["networks"]["cell"]["internal"] is True
    state = Path(scenario["state_dir"])
    assert (state / "secrets" / "mosquitto.passwd").stat().st_mode & 0o077 == 0
    cfg = json.loads((state / "agents" / "dev01.json").read_text())
    assert cfg["broker_host"] == "server" and cfg["run"] == scenario["run"]
    uids = deployment_uids(scenario["devices"])
    for dev in scenario["devices"]:  # only its own config, as a secret owned by its agent's uid; no host /etc
        svc = doc["services"][dev]
        sources = [v["source"] for v in svc.get("volumes", [])]
        assert "/etc" not in sources and not any(src.startswith(str(state)) for src in sources), sources
        assert [x["source"] for x in svc["secrets"]] == [f"agent-{dev}"]
        assert doc["secrets"][f"agent-{dev}"]["file"] == str(state / "agents" / f"{dev}.json")
        st = (state / "agents" / f"{dev}.json").stat()
        assert (st.st_uid, st.st_mode & 0o777) == (uids[dev], 0o400)
        assert svc["cap_drop"] == ["ALL"] and "--user" in svc["command"]


async def test_device_container_shapes_its_own_link_then_runs_its_command_as_its_uid(unique_run_id: str) -> None:
    """With only a device service's capabilities (COMPOSE_CAPS) and no host /etc: the link
    is shaped as planned, then the command runs as the node uid, with no capability and
    no_new_privs."""
    client = docker_client()
    build_image(client)
    mounts = [f"{m.path}:{m.path}:ro" for m in host_mounts()]
    name = f"tb-{unique_run_id}-selfshape"
    argv = [DOCKER, "run", "-d", "--rm", "--name", name, "--label", f"testbed.run={unique_run_id}", "--init",
            "--cap-drop", "ALL", "--network", "none"]
    for cap in COMPOSE_CAPS["device"]:
        argv += ["--cap-add", cap]
    for m in mounts:
        argv += ["-v", m]
    uid = deployment_uids(["dev01"])["dev01"]
    # --network none has only lo: a veth pair (this kernel has no dummy links) stands in for the cell link
    py = sys.executable
    cid = _sh(*argv, IMAGE, "sh", "-c",
              "ip link add eth0 type veth peer name peer0 && ip link set peer0 up && ip link set eth0 up && "
              f"exec {py} -m testbed.emulation.docker.selfshape --up-mbps 12.5 "
              f'--down-mbps 40 --user {uid} -- sleep 60').stdout.strip()
    try:
        pid, child = 0, ""
        ops = plan_self("eth0", "ifb0", 12.5, 40.0)
        for _ in range(100):
            pid = int(_sh(DOCKER, "inspect", "-f", "{{.State.Pid}}", cid).stdout.strip() or 0)
            kids = Path(f"/proc/{pid}/task").exists() and _sh("ps", "--ppid", str(pid), "-o", "pid=,comm=",
                                                              check=False).stdout
            if kids and "sleep" in kids:
                child = kids.split()[0]
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"selfshape did not exec its command: {_sh(DOCKER, 'logs', cid, check=False).stderr}")
        async with open_iproute(f"/proc/{pid}/ns/net") as ipr:
            assert diff_plan(ops, await read_back(ipr, ["eth0", "ifb0"])) == []
        assert "eth0 up 12.5 Mbit/s, down 40 Mbit/s" in _sh(DOCKER, "logs", cid).stderr
        status = dict(ln.split(":", 1) for ln in Path(f"/proc/{child}/status").read_text().splitlines())
        assert status["Uid"].split() == [str(uid)] * 4 and status["Groups"].strip() == ""
        assert int(status["CapEff"], 16) == 0 and status["NoNewPrivs"].strip() == "1"
    finally:
        _sh(DOCKER, "rm", "-f", cid, check=False)


def _check_result(state: Path) -> dict:
    out = state / "out"
    err = out / "error.json"
    assert not err.exists(), err.read_text()
    doc = json.loads((out / "result.json").read_text())
    assert doc["selected"] and doc["total_steps"] > 0
    assert [s["device"] for s in doc["stages"]] == doc["relay_order"]
    assert doc["meta"]["backend"] == "compose"
    assert (out / "image.png").stat().st_size > 0
    return doc


def _check_broker_on_the_cell_address(state: Path) -> None:
    """The broker listened on the server container's cell address, never on every address."""
    listeners = [ln.split() for ln in (state / "broker" / "mosquitto.conf").read_text().splitlines()
                 if ln.startswith("listener ")]
    # the devices' listener and the read-only watch listener (docs/security.md), both on it
    assert 1 <= len(listeners) <= 2 and all(ln[2].startswith("198.18.") for ln in listeners), listeners


@pytest.mark.slow
def test_docker_compose_up_runs_a_generation(scenario: dict) -> None:
    f, run = scenario["compose_file"], scenario["run"]
    project = f"tb-{run}"
    try:
        r = _sh("docker-compose", "-p", project, "-f", f, "up", "--abort-on-container-exit", "--exit-code-from",
                "server", timeout=600, check=False)
        logs = r.stdout + r.stderr
        assert r.returncode == 0, logs[-3000:]
        # every device shaped itself
        assert logs.count("docker_selfshape: eth0 up") >= len(scenario["devices"]), logs[-3000:]
        _check_result(Path(scenario["state_dir"]))
        _check_broker_on_the_cell_address(Path(scenario["state_dir"]))
    finally:
        _sh("docker-compose", "-p", project, "-f", f, "down", "--remove-orphans", timeout=120, check=False)
    assert _labelled(run) == []


def _swarm_state() -> str:
    return _sh(DOCKER, "info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip()


@pytest.mark.slow
def test_single_node_swarm_runs_a_generation(scenario: dict) -> None:
    f, run = scenario["compose_file"], scenario["run"]
    stack = f"tb-{run}"
    made_swarm = _swarm_state() != "active"
    had_gwbridge = _sh(DOCKER, "network", "ls", "-q", "--filter", "name=^docker_gwbridge$").stdout.strip() != ""
    if made_swarm:
        route = _sh("ip", "-4", "-o", "route", "get", "192.0.2.1", check=False).stdout  # a lookup, sends nothing
        addr = route.split("src ")[1].split()[0] if "src " in route else "127.0.0.1"
        _sh(DOCKER, "swarm", "init", "--advertise-addr", addr, "--default-addr-pool", "198.19.128.0/18", timeout=120)
    try:
        node = _sh(DOCKER, "info", "--format", "{{.Swarm.NodeID}}").stdout.strip()
        _sh(DOCKER, "node", "update", "--label-add", "testbed.server=true", "--label-add", "testbed.device=true", node)
        _sh(DOCKER, "stack", "deploy", "-c", f, stack, timeout=180)
        state = Path(scenario["state_dir"])
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if (state / "out" / "result.json").exists() or (state / "out" / "error.json").exists():
                break
            time.sleep(2)
        else:
            ps = _sh(DOCKER, "stack", "ps", stack, "--no-trunc", check=False).stdout
            pytest.fail(f"no result from the stack within 600 s:\n{ps}")
        _check_result(state)
        _check_broker_on_the_cell_address(state)
        services = _sh(DOCKER, "stack", "services", stack, "--format", "{{.Name}}").stdout.split()
        assert sorted(services) == sorted(f"{stack}_{s}" for s in ["server", *scenario["devices"]])
        net = json.loads(_sh(DOCKER, "network", "inspect", f"{stack}_cell").stdout)[0]
        assert net["Driver"] == "overlay" and net["IPAM"]["Config"][0]["Subnet"] == "198.18.0.0/16"
    finally:
        _sh(DOCKER, "stack", "rm", stack, timeout=120, check=False)
        for _ in range(60):  # the stack's tasks and network go asynchronously
            if not _labelled(run) and not _sh(DOCKER, "network", "ls", "-q", "--filter", f"name={stack}_cell").stdout.strip():
                break
            time.sleep(1)
        if made_swarm:
            _sh(DOCKER, "swarm", "leave", "--force", timeout=120, check=False)
            if not had_gwbridge:
                _sh(DOCKER, "network", "rm", "docker_gwbridge", check=False)
    assert _labelled(run) == []
