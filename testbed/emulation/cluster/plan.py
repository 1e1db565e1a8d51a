"""What a cluster on this machine is made of (pure: a name and a node count in, names,
addresses, paths and daemon configurations out; tested without root).

Each node stands for a host: a network namespace `tbc-<cluster>-<node>` with `eth0` on
the datacenter bridge `tbc<cluster>-br` (host side of its veth: `tbc<cluster>-<i>`), its
own Docker daemon (data root, exec root, socket, pid file, containerd directory, cgroup
parent `testbed-cluster/<cluster>/<node>`, its own iptables by being its own namespace)
and its own host name `<cluster>-<node>`. `n1` is the Swarm manager and runs the
registry; the others are workers.

Address plan (docs/design.md): the datacenter networks of clusters come from
198.19.192.0/20, one /24 per cluster — node i at .i, the host's side of the bridge at .254,
the registry on the manager at :5000. Inside each node, Docker keeps the plan's own values
(bip 198.19.255.1/24, pools 198.19.0.0/17, Swarm pool 198.19.128.0/18): every node is its
own namespace, so they never meet the host's daemon or each other.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.errors import InputError, ResourceError

__all__ = [
    "CLUSTER_NAME_RE", "check_cluster_name", "CLUSTER_NETS", "HOST_OCTET", "MAX_NODES", "RUN_ROOT", "DATA_ROOT",
    "CGROUP_TOP", "SWARM_POOL", "DOCKER_BIP", "DOCKER_POOLS", "REGISTRY_PORT", "SWARM_PORT", "NodePlan",
    "ClusterPlan", "plan_cluster", "pick_subnet", "daemon_config", "node_name",
]

#: 1-7 lowercase letters or digits: cluster names go into 15-character interface names.
CLUSTER_NAME_RE = re.compile(r"^[a-z0-9]{1,7}$")
CLUSTER_NETS = "198.19.192.0/20"
HOST_OCTET = 254
MAX_NODES = 32
RUN_ROOT = Path("/run/testbed-cluster")  # exec roots, sockets, pid files, state: gone at reboot
DATA_ROOT = Path("/var/lib/testbed-cluster")  # data roots (images: GBs), logs; and the image store
CGROUP_TOP = "testbed-cluster"
SWARM_POOL = "198.19.128.0/18"
DOCKER_BIP = "198.19.255.1/24"
DOCKER_POOLS = [{"base": "198.19.0.0/17", "size": 24}]
REGISTRY_PORT = 5000
SWARM_PORT = 2377
_IFNAMSIZ = 15


def check_cluster_name(name: str, option: str = "--name") -> str:
    if not isinstance(name, str) or not CLUSTER_NAME_RE.fullmatch(name):
        raise InputError(f"{option}: cluster name {name!r}: use 1-7 lowercase letters or digits "
                         "(it goes into 15-character interface names)")
    return name


def node_name(index: int) -> str:
    return f"n{index}"


@dataclass(frozen=True)
class NodePlan:
    cluster: str
    index: int  # 1 = the manager
    address: str
    run_dir: Path
    data_dir: Path

    @property
    def name(self) -> str:
        return node_name(self.index)

    @property
    def role(self) -> str:
        return "manager" if self.index == 1 else "worker"

    @property
    def hostname(self) -> str:
        return f"{self.cluster}-{self.name}"

    @property
    def netns(self) -> str:
        return f"tbc-{self.cluster}-{self.name}"

    @property
    def veth(self) -> str:
        return f"tbc{self.cluster}-{self.index}"

    @property
    def cgroup(self) -> str:
        return f"{CGROUP_TOP}/{self.cluster}/{self.name}"

    # the daemon's files ------------------------------------------------------------
    @property
    def socket(self) -> Path:
        return self.run_dir / "docker.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "docker.pid"

    @property
    def exec_root(self) -> Path:
        return self.run_dir / "exec"

    @property
    def containerd_run(self) -> Path:
        """Mounted at /run/containerd in the node (containerd's shims put sockets there)."""
        return self.run_dir / "containerd"

    @property
    def sys_scratch(self) -> Path:
        """Where the launcher parks the host's /sys while it mounts the node's own."""
        return self.run_dir / "sys"

    @property
    def config_file(self) -> Path:
        return self.run_dir / "daemon.json"

    @property
    def data_root(self) -> Path:
        return self.data_dir / "docker"

    @property
    def log(self) -> Path:
        return self.data_dir / "dockerd.log"


@dataclass(frozen=True)
class ClusterPlan:
    name: str
    subnet: str
    nodes: tuple[NodePlan, ...]

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    @property
    def host_address(self) -> str:
        return str(ipaddress.ip_network(self.subnet).network_address + HOST_OCTET)

    @property
    def bridge(self) -> str:
        return f"tbc{self.name}-br"

    @property
    def chain(self) -> str:
        """The host's iptables chain that lets the datacenter bridge forward (FORWARD jumps to it)."""
        return f"TBC-{self.name}"

    @property
    def run_dir(self) -> Path:
        return RUN_ROOT / self.name

    @property
    def data_dir(self) -> Path:
        return DATA_ROOT / self.name

    @property
    def volume_image(self) -> Path:
        """The sparse file holding the nodes' data roots (datavol.py)."""
        return self.data_dir / "volume.img"

    @property
    def volume_mount(self) -> Path:
        return self.data_dir / "nodes"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "cluster.json"

    @property
    def manager(self) -> NodePlan:
        return self.nodes[0]

    @property
    def registry(self) -> str:
        """host:port of the registry on the manager, as the daemons name it."""
        return f"{self.manager.address}:{REGISTRY_PORT}"

    @property
    def registry_config(self) -> Path:
        return self.run_dir / "registry.yml"

    @property
    def registry_log(self) -> Path:
        return self.data_dir / "registry.log"

    @property
    def registry_cgroup(self) -> str:
        return f"{self.manager.cgroup}/registry"

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.name == name:
                return n
        raise InputError(f"cluster {self.name} has no node {name!r}; its nodes: {', '.join(n.name for n in self.nodes)}")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "subnet": self.subnet, "nodes": len(self.nodes)}


def pick_subnet(used: set[str]) -> str:
    """The first /24 of CLUSTER_NETS that no other cluster (or host address) uses."""
    for net in ipaddress.ip_network(CLUSTER_NETS).subnets(new_prefix=24):
        if not any(net.overlaps(ipaddress.ip_network(u, strict=False)) for u in used):
            return str(net)
    raise ResourceError(f"every /24 of {CLUSTER_NETS} is in use by a cluster; take one down "
                        "(`testbed cluster down --name NAME`)")


def plan_cluster(name: str, nodes: int, subnet: str) -> ClusterPlan:
    check_cluster_name(name)
    if not isinstance(nodes, int) or not 1 <= nodes <= MAX_NODES:
        raise InputError(f"--nodes: {nodes!r}: a cluster has 1 to {MAX_NODES} nodes")
    net = ipaddress.ip_network(subnet)
    if net.prefixlen != 24 or not net.subnet_of(ipaddress.ip_network(CLUSTER_NETS)):
        raise InputError(f"subnet {subnet}: a cluster's datacenter network is a /24 inside {CLUSTER_NETS}")
    run_dir, data_dir = RUN_ROOT / name, DATA_ROOT / name
    plan = ClusterPlan(name, str(net), tuple(
        NodePlan(name, i, str(net.network_address + i), run_dir / node_name(i), data_dir / "nodes" / node_name(i))
        for i in range(1, nodes + 1)))
    for ifname in [plan.bridge] + [n.veth for n in plan.nodes]:
        assert len(ifname) <= _IFNAMSIZ, ifname  # guaranteed by the name rule and MAX_NODES
    return plan


def daemon_config(plan: ClusterPlan, node: NodePlan) -> dict[str, Any]:
    """The node daemon's whole configuration (`dockerd --config-file`): nothing is read
    from /etc/docker/daemon.json and nothing is shared with the host's daemon."""
    return {
        "data-root": str(node.data_root),
        "exec-root": str(node.exec_root),
        "pidfile": str(node.pidfile),
        "hosts": [node.docker_host],
        "cgroup-parent": f"/{node.cgroup}",
        "bip": DOCKER_BIP,
        "default-address-pools": DOCKER_POOLS,
        "insecure-registries": [plan.subnet],
        "storage-driver": "overlay2",
        "userland-proxy": False,  # nothing is published: no routing mesh without IPVS
        "log-driver": "json-file",
        "log-opts": {"max-size": "10m", "max-file": "2"},
        "live-restore": False,
    }
