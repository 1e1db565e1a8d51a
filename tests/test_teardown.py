"""Teardown that always works or says why: docker networks held by (stale) endpoints are
retried and force-disconnected; a step that fails does not stop the others and makes
`testbed down` exit 4 with the reason — never a thread traceback with exit 0.

The fake-client tests run anywhere; the docker tests (root, docker) hold a real network
with a live endpoint, and bring the paper scenario up and down 10 times in a row.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import docker.errors
import pytest

from testbed.emulation import runs
from testbed.emulation.docker.cleanup import remove_network
from testbed.errors import ResourceError

REPO = Path(__file__).resolve().parent.parent
TESTBED = [sys.executable, "-m", "testbed.cli"]


class _FakeNetworks:
    """A network that refuses removal while it has endpoints; each forced disconnect
    clears one (docker 20.10 releases endpoints asynchronously)."""

    def __init__(self, endpoints: set[str]):
        self.endpoints = set(endpoints)
        self.removed = False
        self.remove_calls = 0

    def get(self, name):
        if self.removed:
            raise docker.errors.NotFound("gone")
        outer = self

        class Net:
            attrs = {"Containers": {}}  # stale endpoints are not listed: only their names clear them

            def remove(self):
                outer.remove_calls += 1
                if outer.endpoints:
                    raise docker.errors.APIError(f"error while removing network: network {name} has active endpoints")
                outer.removed = True

        return Net()


class _FakeClient:
    def __init__(self, endpoints: set[str], clears: bool = True):
        self.networks = _FakeNetworks(endpoints)
        self.disconnected: list[str] = []
        outer = self

        class Api:
            def disconnect_container_from_network(self, container, net, force=False):
                assert force
                outer.disconnected.append(container)
                if clears and container in outer.networks.endpoints:
                    outer.networks.endpoints.discard(container)
                else:
                    raise docker.errors.APIError("container is not connected to the network")

        self.api = Api()


def test_a_network_with_stale_endpoints_is_force_disconnected_and_removed():
    client = _FakeClient({"tb-x-dev01", "tb-x-dev02"})
    assert remove_network(client, "tb-x", ["tb-x-server", "tb-x-dev01", "tb-x-dev02"], timeout_s=5) is True
    assert client.networks.removed and client.networks.remove_calls == 2
    assert {"tb-x-dev01", "tb-x-dev02"} <= set(client.disconnected)


def test_a_network_that_stays_held_is_an_error_naming_it_within_the_bound():
    client = _FakeClient({"ghost"}, clears=False)
    t0 = time.monotonic()
    with pytest.raises(ResourceError, match=r"docker network tb-x: .*active endpoints.*testbed down --all"):
        remove_network(client, "tb-x", ["tb-x-dev01"], timeout_s=1.0)
    assert time.monotonic() - t0 < 3.0
    assert not client.networks.removed


def test_a_network_already_gone_is_not_an_error():
    client = _FakeClient(set())
    client.networks.removed = True
    assert remove_network(client, "tb-x", []) is False


def test_teardown_detaches_every_container_one_at_a_time_before_removing_any(monkeypatch):
    """The order that kept docker's endpoint count right (bench/docker_teardown.py)."""
    from testbed.emulation.docker import cleanup

    log: list[tuple[str, str]] = []
    names = [f"tb-x-dev{i:02d}" for i in range(1, 6)]

    class Ctr:
        def __init__(self, name):
            self.name = name

        def remove(self, force=False):
            log.append(("remove", self.name))

    class Net:
        id = name = "tb-x"
        attrs = {"Labels": {"testbed.run": "x"}, "Containers": {n: {"Name": n} for n in names}}

        def remove(self):
            log.append(("network rm", self.name))

    class Client:
        class containers:
            @staticmethod
            def list(all, filters):
                gone = {n for k, n in log if k == "remove"}
                return [Ctr(n) for n in names if n not in gone]

        class networks:
            @staticmethod
            def list(filters):
                return [Net()]

            @staticmethod
            def get(name):
                if ("network rm", "tb-x") in log:
                    raise docker.errors.NotFound("gone")
                return Net()

        class api:
            @staticmethod
            def disconnect_container_from_network(container, net, force=False):
                log.append(("disconnect", container))

    monkeypatch.setattr(cleanup, "release_host_side", lambda run: [])
    removed = cleanup._remove_sync(Client(), "x")
    kinds = [k for k, _ in log]
    assert kinds[:5] == ["disconnect"] * 5 and [n for _, n in log[:5]] == names  # one by one, first
    assert sorted(n for k, n in log if k == "remove") == names and kinds[-1] == "network rm"
    assert "network tb-x" in removed and sum(x.startswith("container ") for x in removed) == 5


def test_an_error_inside_the_cleanup_thread_reaches_the_caller():
    async def boom():
        raise ResourceError("docker network tb-x: has active endpoints")

    with pytest.raises(ResourceError, match="active endpoints"):
        runs._run_sync(boom())


@pytest.mark.root
def test_down_exits_4_naming_what_failed_after_removing_the_rest(unique_run_id, monkeypatch, capsys):
    from testbed.cli import main

    run = unique_run_id
    d = runs.make_run_dir(run)

    async def failing_docker(run_id):
        raise ResourceError(f"docker network tb-{run_id}: has active endpoints after 30 s of retries")

    monkeypatch.setattr(runs, "_remove_docker", failing_docker)
    with pytest.raises(SystemExit) as e:
        main(["down", "--run", run, "--json"])
    captured = capsys.readouterr()
    assert e.value.code == 4, captured
    assert "Traceback" not in captured.err and "active endpoints" in captured.err
    assert "testbed down" in captured.err  # the fix
    doc = json.loads(captured.out)
    assert doc["removed"][run] == [f"state {d}"] and not d.exists()  # the rest was still removed
    assert "docker containers and networks" in doc["failed"][run][0]


@pytest.mark.root
def test_down_refuses_a_state_directory_the_testbed_did_not_make(unique_run_id, capsys):
    from testbed.cli import main

    d = runs.RUN_ROOT / unique_run_id
    d.mkdir(parents=True)
    try:
        (d / "notes").write_text("not the testbed's")
        with pytest.raises(SystemExit) as e:
            main(["down", "--run", unique_run_id])
        assert e.value.code == 4 and "not made by the testbed" in " ".join(capsys.readouterr().err.split())
        assert (d / "notes").exists()
    finally:
        (d / "notes").unlink(missing_ok=True)
        d.rmdir()


def _docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=check)


@pytest.mark.root
@pytest.mark.docker
def test_a_network_with_a_live_endpoint_is_removed_by_forced_disconnect(unique_run_id):
    """What `down` meets when a container is still attached: a plain `network rm` fails with
    "active endpoints"; remove_network clears the endpoint and removes the network."""
    import docker
    import docker.types

    from testbed.emulation.docker.image import IMAGE, build_image, docker_client, host_mounts

    run = unique_run_id
    client = docker_client()
    build_image(client)
    name = f"tb-{run}"
    net = client.networks.create(name, driver="bridge", internal=True, labels={"testbed.run": run})
    mounts = [docker.types.Mount(m.path, m.path, type="bind", read_only=True) for m in host_mounts()]
    ctr = client.containers.run(IMAGE, ["sleep", "60"], name=f"tb-{run}-dev01", labels={"testbed.run": run},
                                network=name, mounts=mounts, detach=True, init=True)
    try:
        with pytest.raises(docker.errors.APIError, match="active endpoints"):
            net.remove()
        assert remove_network(client, name, [ctr.name], timeout_s=30) is True
        assert not _docker("network", "ls", "-q", "--filter", f"name=^{name}$").stdout.strip()
    finally:
        ctr.remove(force=True)  # unique_run_id's teardown removes the rest, if anything


def _leftovers() -> list[str]:
    out = _docker("ps", "-aq", "--filter", "label=testbed.run").stdout.split()
    out += _docker("network", "ls", "-q", "--filter", "label=testbed.run").stdout.split()
    return out


@pytest.mark.root
@pytest.mark.docker
@pytest.mark.slow
def test_docker_paper_up_down_10_times_leaves_no_network_and_no_container(topologies):
    import uuid

    assert _leftovers() == [], "docker objects of another run exist; `testbed down --all` first"
    made: list[str] = []
    try:
        for i in range(10):
            run = "u" + uuid.uuid4().hex[:5]
            made.append(run)
            up = subprocess.run([*TESTBED, "up", str(topologies / "paper.yaml"), "--backend", "docker", "--run", run,
                                 "--json"], capture_output=True, text=True, timeout=300, cwd=REPO)
            assert up.returncode == 0, f"cycle {i}: {up.stderr[-2000:]}"
            down = subprocess.run([*TESTBED, "down", "--run", run], capture_output=True, text=True, timeout=300,
                                  cwd=REPO)
            assert down.returncode == 0 and "Traceback" not in down.stderr, f"cycle {i}: {down.stderr[-2000:]}"
            assert _leftovers() == [], f"cycle {i}: left {_leftovers()}"
    finally:
        for run in made:
            runs.cleanup_run(run)


@pytest.mark.root
def test_the_host_side_of_a_docker_bridge_is_released_before_its_network_is_removed(unique_run_id):
    """A network docker cannot remove must not keep the host's /32 and route to the cell."""
    from pyroute2 import IPRoute

    from testbed.emulation.docker.cleanup import release_host_side
    from testbed.emulation.docker.spec import bridge_name
    from testbed.model.names import CELL_NET, HOST_ADDRESS

    br = bridge_name(unique_run_id)
    with IPRoute() as ipr:
        ipr.link("add", ifname=br, kind="bridge")  # no ports: it carries nothing
        try:
            idx = ipr.link_lookup(ifname=br)[0]
            ipr.link("set", index=idx, state="up")
            ipr.addr("add", index=idx, address=HOST_ADDRESS, prefixlen=32)
            # a high metric: never chosen over another run's host route while the test runs
            ipr.route("add", dst=CELL_NET, oif=idx, priority=4242)
            removed = release_host_side(unique_run_id)
            assert removed == [f"route {CELL_NET} via {br}"]
            assert not [r for r in ipr.get_routes(family=2, oif=idx) if r.get_attr("RTA_DST") == CELL_NET.split("/")[0]]
            assert not ipr.get_addr(index=idx, family=2)
            assert release_host_side(unique_run_id) == []  # idempotent
        finally:
            ipr.link("del", ifname=br)
