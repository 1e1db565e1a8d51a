"""The cluster's pure parts, without root: the plan (names, addresses, paths, daemon
configurations), the image format (tar stream, config, manifest, content keys), the
registry configuration and the cgroup subtree against a stand-in directory."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import re
import tarfile
from pathlib import Path

import pytest

from testbed.emulation.cluster import cgroup_tree
from testbed.emulation.cluster.layers import Entry, content_key
from testbed.emulation.cluster.oci import LAYER_TYPE, MANIFEST_TYPE, BlobRef, image_config, manifest, tar_stream
from testbed.emulation.cluster.plan import (CLUSTER_NETS, DOCKER_BIP, DOCKER_POOLS, MAX_NODES, SWARM_POOL,
                                            daemon_config, pick_subnet, plan_cluster)
from testbed.emulation.cluster.registry import registry_config
from testbed.errors import InputError, ResourceError
from testbed.model.names import CELL_NET
from testbed.cli.app import main


def test_plan_names_fit_interfaces_and_never_look_like_a_run() -> None:
    plan = plan_cluster("abcdefg", MAX_NODES, "198.19.192.0/24")
    ifnames = [plan.bridge] + [n.veth for n in plan.nodes]
    assert all(len(i) <= 15 for i in ifnames) and len(set(ifnames)) == len(ifnames)
    # `testbed down --all` and the suite's leftover guard find runs by these patterns
    run_ns, run_link = re.compile(r"^tb-([a-z0-9]{1,7})-"), re.compile(r"^tb([a-z0-9]{1,7})h$")
    for name in ("h", "abh", "abcdefh"):
        p = plan_cluster(name, 3, "198.19.192.0/24")
        assert not any(run_link.match(i) for i in [p.bridge] + [n.veth for n in p.nodes])
        assert not any(run_ns.match(n.netns) for n in p.nodes)
        assert not any(n.cgroup.startswith("testbed/") for n in p.nodes)


def test_plan_addresses_come_from_the_address_plan() -> None:
    plan = plan_cluster("c1", 3, "198.19.193.0/24")
    net = ipaddress.ip_network(plan.subnet)
    assert net.subnet_of(ipaddress.ip_network(CLUSTER_NETS))
    assert net.subnet_of(ipaddress.ip_network("198.18.0.0/15"))
    for other in [CELL_NET, SWARM_POOL, DOCKER_BIP, *(p["base"] for p in DOCKER_POOLS)]:
        assert not ipaddress.ip_network(CLUSTER_NETS).overlaps(ipaddress.ip_network(other, strict=False)), other
    assert [n.address for n in plan.nodes] == ["198.19.193.1", "198.19.193.2", "198.19.193.3"]
    assert plan.host_address == "198.19.193.254" and plan.registry == "198.19.193.1:5000"
    assert [n.role for n in plan.nodes] == ["manager", "worker", "worker"]


def test_pick_subnet_skips_used_ones_and_fails_when_full() -> None:
    assert pick_subnet(set()) == "198.19.192.0/24"
    assert pick_subnet({"198.19.192.0/24", "198.19.193.0/24"}) == "198.19.194.0/24"
    every = {str(n) for n in ipaddress.ip_network(CLUSTER_NETS).subnets(new_prefix=24)}
    with pytest.raises(ResourceError, match="in use"):
        pick_subnet(every)


@pytest.mark.parametrize("name,nodes", [("Dev", 3), ("toolongname", 3), ("a-b", 3), ("", 3), ("ok", 0), ("ok", 33)])
def test_plan_rejects_bad_names_and_counts(name: str, nodes: int) -> None:
    with pytest.raises(InputError):
        plan_cluster(name, nodes, "198.19.192.0/24")


def test_plan_rejects_a_subnet_outside_the_plan() -> None:
    with pytest.raises(InputError, match="198.19.192.0/20"):
        plan_cluster("c1", 3, "10.0.0.0/24")


def test_daemon_configs_share_nothing_with_each_other_or_the_hosts_daemon() -> None:
    plan = plan_cluster("c1", 3, "198.19.192.0/24")
    cfgs = [daemon_config(plan, n) for n in plan.nodes]
    for key in ("data-root", "exec-root", "pidfile", "cgroup-parent"):
        assert len({c[key] for c in cfgs}) == 3, key
    assert len({c["hosts"][0] for c in cfgs}) == 3
    for c in cfgs:
        assert not c["data-root"].startswith("/var/lib/docker")
        assert c["hosts"][0] != "unix:///var/run/docker.sock" and c["exec-root"] not in ("/var/run/docker", "/run/docker")
        assert c["cgroup-parent"].startswith("/testbed-cluster/c1/")
        assert c["insecure-registries"] == [plan.subnet]  # the registry on the manager is plain HTTP
        assert ipaddress.ip_address(plan.registry.split(":")[0]) in ipaddress.ip_network(c["insecure-registries"][0])
    assert all(len(str(n.socket)) < 100 and len(str(n.exec_root / "containerd" / "containerd.sock")) < 100
               for n in plan.nodes)  # unix socket paths are limited to 108 bytes


def test_data_roots_live_under_one_directory_per_cluster() -> None:
    plan = plan_cluster("c1", 3, "198.19.192.0/24")
    for n in plan.nodes:
        assert plan.data_dir in n.data_root.parents and plan.volume_mount in n.data_root.parents
        assert plan.run_dir in n.run_dir.parents


def _entries(tmp_path: Path) -> list[Entry]:
    f = tmp_path / "payload.bin"
    f.write_bytes(b"x" * 1000)
    long_name = "d/" + "n" * 150  # past ustar's 100-character names
    return [Entry("d", "dir", 0o755), Entry("d/a.txt", "file", 0o644, 5, 1, data=b"hello"),
            Entry("d/link", "symlink", 0o777, linkname="a.txt"),
            Entry(long_name, "file", 0o600, 1000, 2, source=str(f))]


def test_tar_stream_is_a_tar_with_every_entry_owned_by_root(tmp_path: Path) -> None:
    blob = b"".join(tar_stream(_entries(tmp_path)))
    assert len(blob) % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        members = {m.name: m for m in tf.getmembers()}
        assert set(members) == {e.name for e in _entries(tmp_path)}
        assert tf.extractfile("d/a.txt").read() == b"hello"
        assert tf.extractfile("d/" + "n" * 150).read() == b"x" * 1000
        assert members["d/link"].issym() and members["d/link"].linkname == "a.txt"
        assert all(m.uid == 0 and m.gid == 0 for m in members.values())
        assert members["d/" + "n" * 150].mode == 0o600


def test_tar_stream_fails_when_a_file_shrinks(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    with pytest.raises(ResourceError, match="shrank"):
        b"".join(tar_stream([Entry("f", "file", 0o644, 10, 0, source=str(f))]))


def test_content_key_follows_mtime_size_and_mode(tmp_path: Path) -> None:
    base = _entries(tmp_path)
    k = content_key(base)
    assert content_key(base) == k
    for i, changed in ((1, Entry("d/a.txt", "file", 0o644, 5, 9, data=b"hello")),
                       (1, Entry("d/a.txt", "file", 0o755, 5, 1, data=b"hello")),
                       (2, Entry("d/link", "symlink", 0o777, linkname="b.txt"))):
        assert content_key(base[:i] + [changed] + base[i + 1:]) != k


def test_config_and_manifest_name_uncompressed_layers_by_digest() -> None:
    layers = [BlobRef("sha256:" + "a" * 64, 10), BlobRef("sha256:" + "b" * 64, 20)]
    cfg = image_config(layers, {"testbed.image": "travel"}, ["PATH=/usr/bin"], ["/usr/bin/sleep", "infinity"])
    doc = json.loads(cfg)
    assert doc["rootfs"] == {"type": "layers", "diff_ids": [b.digest for b in layers]}  # uncompressed: digest = diff id
    assert doc["os"] == "linux" and doc["config"]["Cmd"] == ["/usr/bin/sleep", "infinity"]
    cref = BlobRef("sha256:" + hashlib.sha256(cfg).hexdigest(), len(cfg))
    man = json.loads(manifest(cref, layers))
    assert man["mediaType"] == MANIFEST_TYPE and man["config"]["digest"] == cref.digest
    assert [(la["mediaType"], la["digest"], la["size"]) for la in man["layers"]] == \
        [(LAYER_TYPE, b.digest, b.size) for b in layers]


def test_registry_config_listens_only_where_told(tmp_path: Path) -> None:
    text = registry_config(tmp_path / "store", "198.19.192.1:5000")
    assert "addr: 198.19.192.1:5000" in text and f"rootdirectory: {tmp_path / 'store'}" in text
    assert "addr: :" not in text and "0.0.0.0" not in text  # never every address


def test_cgroup_subtree_in_a_stand_in_tree(tmp_path: Path) -> None:
    for h in ("cpu", "pids", "cpuset"):
        (tmp_path / h).mkdir()
    (tmp_path / "cpuset" / "cpuset.cpus").write_text("0-1\n")
    leaves = cgroup_tree.make("testbed-cluster/c1/n1/daemon", root=tmp_path)
    assert sorted(p.relative_to(tmp_path).parts[0] for p in leaves) == ["cpu", "cpuset", "pids"]
    (tmp_path / "pids/testbed-cluster/c1/n1/daemon/cgroup.procs").write_text("")
    assert len(cgroup_tree.procs_files("testbed-cluster/c1/n1/daemon", root=tmp_path)) == 3
    assert cgroup_tree.pids("testbed-cluster/c1", root=tmp_path) == set()
    removed = cgroup_tree.remove("testbed-cluster/c1", root=tmp_path)
    assert len(removed) == 3 and not any((tmp_path / h / "testbed-cluster" / "c1").exists() for h in ("cpu", "pids"))


def test_cli_rejects_a_bad_cluster_name(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["cluster", "status", "--name", "Bad_Name"])
    assert e.value.code == 2
    assert "cluster name" in capsys.readouterr().err


def test_cli_status_of_a_cluster_that_is_not_up(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["cluster", "status", "--name", "nosuch7"])
    assert e.value.code == 4
    assert "cluster up" in capsys.readouterr().err
