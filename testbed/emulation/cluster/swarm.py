"""The cluster's Swarm: init on the manager, join the workers, label the nodes, read each
node's state as the manager sees it (docker SDK; every call bounded)."""

from __future__ import annotations

import time
from typing import Any

import docker
import docker.errors

from testbed.emulation.cluster.plan import SWARM_POOL, SWARM_PORT, ClusterPlan, NodePlan
from testbed.errors import ResourceError

__all__ = ["HEARTBEAT_S", "init_swarm", "join_swarm", "label_nodes", "swarm_nodes"]

#: How often workers report to the manager; a node that misses its heartbeat is `down`.
#: Swarm's default is 5 s; 2 s lets a failure test see a lost node sooner.
HEARTBEAT_S = 2


def _wrap(what: str, e: docker.errors.DockerException) -> ResourceError:
    return ResourceError(f"{what}: {getattr(e, 'explanation', None) or e}")


def init_swarm(client: docker.DockerClient, plan: ClusterPlan) -> str:
    """`docker swarm init` on the manager; returns the workers' join token."""
    m = plan.manager
    try:
        client.swarm.init(advertise_addr=m.address, listen_addr=f"{m.address}:{SWARM_PORT}",
                          default_addr_pool=[SWARM_POOL], subnet_size=24,
                          dispatcher_heartbeat_period=HEARTBEAT_S * 10**9)
        client.swarm.reload()
        return client.swarm.attrs["JoinTokens"]["Worker"]
    except docker.errors.DockerException as e:
        raise _wrap(f"swarm init on {m.name}", e) from None


def join_swarm(client: docker.DockerClient, plan: ClusterPlan, node: NodePlan, token: str) -> None:
    try:
        client.swarm.join(remote_addrs=[f"{plan.manager.address}:{SWARM_PORT}"], join_token=token,
                          advertise_addr=node.address, listen_addr=f"{node.address}:{SWARM_PORT}")
    except docker.errors.DockerException as e:
        raise _wrap(f"swarm join of {node.name}", e) from None


def label_nodes(client: docker.DockerClient, plan: ClusterPlan, timeout_s: float = 30.0) -> None:
    """testbed.cluster, testbed.node (n1...) and testbed.role on every Swarm node, by host
    name (a node that has just joined reports its description a moment later: waited for)."""
    by_host = {n.hostname: n for n in plan.nodes}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            listed = client.nodes.list()
        except docker.errors.DockerException as e:
            raise _wrap("listing the swarm's nodes", e) from None
        if all(sn.attrs.get("Description", {}).get("Hostname") for sn in listed) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for sn in listed:
        n = by_host.get(sn.attrs.get("Description", {}).get("Hostname"))
        if n is None:
            continue
        spec = dict(sn.attrs["Spec"])
        spec["Labels"] = {**spec.get("Labels", {}), "testbed.cluster": plan.name, "testbed.node": n.name,
                          "testbed.role": n.role}
        try:
            sn.update(spec)
        except docker.errors.DockerException as e:
            raise _wrap(f"labelling swarm node {n.name}", e) from None


def swarm_nodes(client: docker.DockerClient) -> dict[str, dict[str, Any]]:
    """Host name -> {id, state (ready, down, unknown, disconnected), availability, role,
    address} as the manager sees it."""
    out = {}
    for sn in client.nodes.list():
        a = sn.attrs
        host = a.get("Description", {}).get("Hostname")
        if not host:  # just joined: not described yet
            continue
        out[host] = {
            "id": a["ID"], "state": a["Status"]["State"], "availability": a["Spec"].get("Availability"),
            "role": a["Spec"].get("Role"), "address": a["Status"].get("Addr"),
        }
    return out
