"""Pure tests of the docker backend's plans: container and network arguments, the skeleton
image, the compose/stack document and the self-shaping ops. No daemon needed."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import yaml

from testbed.emulation.docker.compose import ComposeNode, compose_doc
from testbed.emulation.docker.image import etc_files, host_mounts, skeleton_tar
from testbed.emulation.docker.selfshape import plan_self
from testbed.emulation.docker.spec import (
    GpuHost,
    NodeSpec,
    bridge_name,
    container_plan,
    detect_gpus,
    cpu_quota_us,
    network_plan,
)
from testbed.emulation.shaping import CELL_CLASS, HTB_HANDLE, INGRESS_HANDLE, HtbClass, Qdisc, U32Filter
from testbed.errors import ResourceError, ShapingError


def test_container_plan_carries_profile_limits_labels_and_address() -> None:
    node = NodeSpec("dev03", "device", "198.18.0.12", cpu_cores=0.5, memory_mb=1536, pids_max=512)
    p = container_plan("r1", node, "img:x", [("/usr", "/usr", True)])
    assert p.host_config["pids_limit"] == 512  # docker's pids cgroup: a fork bomb stops in the container
    assert p.name == "tb-r1-dev03" and p.hostname == "dev03" and p.ipv4_address == "198.18.0.12"
    assert p.labels == {"testbed.run": "r1", "testbed.node": "dev03", "testbed.role": "device"}
    assert (p.host_config["cpu_quota"], p.host_config["cpu_period"]) == (50_000, 100_000)  # --cpus 0.5
    assert p.host_config["mem_limit"] == p.host_config["memswap_limit"] == "1536m"
    assert p.host_config["network_mode"] == "tb-r1" and p.host_config["init"] is True
    assert "device_requests" not in p.host_config  # no GPU on this host description
    assert p.binds == [("/usr", "/usr", True)]
    assert "pids_limit" not in container_plan("r1", NodeSpec("server", "server", "198.18.0.1"), "img:x", []).host_config


def test_containers_keep_only_the_capabilities_of_their_role_and_devices_run_as_nobody() -> None:
    dev = container_plan("r1", NodeSpec("dev03", "device", "198.18.0.12"), "i", [])
    srv = container_plan("r1", NodeSpec("server", "server", "198.18.0.1"), "i", [])
    for p in (dev, srv):
        assert p.host_config["cap_drop"] == ["ALL"] and p.host_config["security_opt"] == ["no-new-privileges"]
    assert dev.host_config["cap_add"] == [] and dev.user == "65534:65534"  # the host shapes and forks agents
    assert srv.host_config["cap_add"] == ["DAC_READ_SEARCH", "SETGID", "SETUID"] and srv.user is None  # the broker


def test_gpu_requests_only_where_the_host_has_gpus_and_the_toolkit() -> None:
    node = NodeSpec("dev01", "device", "198.18.0.10", 1.0, 1024, gpu_share_pct=25)
    assert "device_requests" not in container_plan("r1", node, "i", [], GpuHost(count=1, toolkit=False)).host_config
    assert "device_requests" not in container_plan("r1", node, "i", [], GpuHost(count=0, toolkit=True)).host_config
    p = container_plan("r1", node, "i", [], GpuHost(count=2, toolkit=True, mps_pipe_dir="/tmp/nvidia-mps"))
    assert p.host_config["device_requests"] == [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]
    assert p.environment["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
    assert p.environment["CUDA_MPS_PIPE_DIRECTORY"] == "/tmp/nvidia-mps" and p.host_config["ipc_mode"] == "host"
    assert ("/tmp/nvidia-mps", "/tmp/nvidia-mps", False) in p.binds
    # a node without a share gets no GPU even on a GPU host
    plain = NodeSpec("dev02", "device", "198.18.0.11", 1.0, 1024)
    assert "device_requests" not in container_plan("r1", plain, "i", [], GpuHost(1, True)).host_config


def test_detect_gpus_reads_device_nodes(tmp_path: Path) -> None:
    assert detect_gpus(tmp_path).count == 0
    for n in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / n).touch()
    assert detect_gpus(tmp_path).count == 2


def test_addresses_outside_the_cell_and_long_run_ids_are_refused() -> None:
    with pytest.raises(ResourceError, match="outside 198.18.0.0/16"):
        container_plan("r1", NodeSpec("d", "device", "10.0.0.5"), "i", [])
    with pytest.raises(ResourceError, match="too long"):
        bridge_name("abcdefghijkl")


def test_network_plan_is_internal_on_the_cell_subnet_with_the_host_at_255_254() -> None:
    n = network_plan("r1")
    assert n["internal"] is True and n["driver"] == "bridge"
    assert n["subnet"] == "198.18.0.0/16" and n["gateway"] == "198.18.255.254"
    assert n["options"]["com.docker.network.bridge.name"] == "tbr1br"
    assert n["labels"] == {"testbed.run": "r1"}


def test_cpu_quota_floor() -> None:
    assert cpu_quota_us(1.0) == 100_000
    assert cpu_quota_us(0.001) == 1000  # the kernel's minimum quota


def test_skeleton_has_merged_usr_links_and_a_real_sbin() -> None:
    with tarfile.open(fileobj=io.BytesIO(skeleton_tar())) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert members["bin"].issym() and members["bin"].linkname == "usr/bin"
    assert members["lib64"].issym() and members["lib64"].linkname == "usr/lib64"
    assert members["sbin"].isdir()  # docker mounts its init at /sbin/docker-init
    assert members["tmp"].mode == 0o1777
    files = {n for n, m in members.items() if not (m.isdir() or m.issym())}
    assert files == {"etc/passwd", "etc/group", "etc/nsswitch.conf"}  # the only content: no host /etc
    passwd = etc_files()["etc/passwd"].splitlines()
    assert passwd[0].startswith("root:x:0:0:") and passwd[-1].startswith("nobody:x:65534:65534:")


def test_host_mounts_are_unique_and_not_nested() -> None:
    paths = [m.path for m in host_mounts()]
    assert "/usr" in paths and "/etc" not in paths  # the image brings its own minimal /etc
    assert len(paths) == len(set(paths))
    for a in paths:
        for b in paths:
            assert a == b or not b.startswith(a.rstrip("/") + "/"), (a, b)
    assert all(m.read_only for m in host_mounts())


def _doc(tmp_path: Path) -> dict:
    nodes = [ComposeNode("server", "server", 1.0, 4096, ["srv"]),
             ComposeNode("dev01", "device", 0.5, 1536, ["agent", "dev01"], tmp_path / "small" / "agents" / "dev01.json")]
    return compose_doc("small", "small", nodes, "testbed-node:local", ["/usr"], tmp_path / "small")


def test_compose_doc_fits_compose_and_swarm(tmp_path: Path) -> None:
    doc = yaml.safe_load(yaml.safe_dump(_doc(tmp_path)))
    assert doc["version"] == "3.8"
    net = doc["networks"]["cell"]
    assert net["internal"] is True and net["ipam"] == {"config": [{"subnet": "198.18.0.0/16"}]}
    assert "driver" not in net  # bridge under compose, overlay under Swarm
    srv, dev = doc["services"]["server"], doc["services"]["dev01"]
    for svc in (srv, dev):
        assert svc["deploy"]["endpoint_mode"] == "dnsrr"  # no IPVS on this kernel
        assert svc["cap_drop"] == ["ALL"] and svc["init"] is True
        assert svc["labels"]["testbed.run"] == "small"
    assert dev["cap_add"] == ["NET_ADMIN", "SETGID", "SETUID"]  # shape, then drop to its uid
    assert "NET_ADMIN" not in srv["cap_add"]
    assert srv["deploy"]["placement"]["constraints"] == ["node.labels.testbed.server == true"]
    assert dev["deploy"]["placement"]["constraints"] == ["node.labels.testbed.device == true"]
    assert dev["deploy"]["resources"]["limits"] == {"cpus": "0.5", "memory": "1536M"}
    state = str(tmp_path / "small")
    assert {"type": "bind", "source": state, "target": state, "read_only": False} in srv["volumes"]
    assert [v["source"] for v in dev["volumes"]] == ["/usr"]  # no state directory: only its own config
    assert dev["secrets"] == [{"source": "agent-dev01", "target": "agent.json"}]
    assert doc["secrets"] == {"agent-dev01": {"file": f"{state}/agents/dev01.json"}}
    assert dev["depends_on"] == ["server"]


def test_compose_doc_needs_one_server(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one server"):
        compose_doc("r", "n", [ComposeNode("dev01", "device", 1, 1, ["a"])], "i", [], tmp_path)


def test_self_shaping_plan_uplink_on_eth0_downlink_through_the_ifb() -> None:
    ops = plan_self("eth0", "ifb0", 20.0, 50.0)
    assert Qdisc("eth0", "htb", HTB_HANDLE, 0xFFFFFFFF) in ops
    assert HtbClass("eth0", CELL_CLASS, HTB_HANDLE, 20_000_000, 20_000_000) in ops
    assert HtbClass("ifb0", CELL_CLASS, HTB_HANDLE, 50_000_000, 50_000_000) in ops
    assert U32Filter("eth0", HTB_HANDLE, 1, None, None, classid=CELL_CLASS) in ops
    assert U32Filter("eth0", INGRESS_HANDLE, 1, None, None, redirect_ifname="ifb0") in ops
    # the IFB's qdisc exists before the redirect that feeds it
    assert ops.index(Qdisc("ifb0", "htb", HTB_HANDLE, 0xFFFFFFFF)) < ops.index(
        U32Filter("eth0", INGRESS_HANDLE, 1, None, None, redirect_ifname="ifb0"))
    with pytest.raises(ShapingError):
        plan_self("eth0", "ifb0", 0.0, 10.0)


def test_no_daemon_is_a_resource_error_that_says_how_to_start_one(monkeypatch, tmp_path: Path) -> None:
    from testbed.emulation.docker.image import docker_client

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such.sock")
    with pytest.raises(ResourceError, match="start-dockerd") as e:
        docker_client(timeout_s=5)
    assert e.value.exit_code == 4


@pytest.mark.parametrize("euid", [pytest.param(0, marks=pytest.mark.root), 1000])
def test_compose_gives_each_device_its_config_readable_by_its_agent_alone(tmp_path: Path, monkeypatch, euid) -> None:
    """As root each config is its agent's uid's (0400); otherwise 0444 inside the 0700 state
    directory (docker-compose bind-mounts the file as it is)."""
    import os

    from testbed.composition import deployment as compose_server
    from testbed.emulation.node_uids import deployment_uids

    me = os.geteuid()
    monkeypatch.setattr(compose_server.os, "geteuid", lambda: euid)
    topologies = Path(__file__).resolve().parent.parent / "topologies"
    scen = compose_server.write_scenario(topologies / "small.yaml", tmp_path)
    assert scen.state_dir.stat().st_mode & 0o777 == 0o700
    doc = yaml.safe_load(scen.compose_file.read_text())
    uids = deployment_uids(scen.devices)
    for dev in scen.devices:
        cfg = scen.state_dir / "agents" / f"{dev}.json"
        st = cfg.stat()
        assert (st.st_mode & 0o777, st.st_uid) == ((0o400, uids[dev]) if euid == 0 else (0o444, me))
        assert doc["secrets"][f"agent-{dev}"] == {"file": str(cfg)}
        cmd = doc["services"][dev]["command"]
        assert cmd[cmd.index("--user") + 1] == str(uids[dev]) and cmd[-1] == "/run/secrets/agent.json"
