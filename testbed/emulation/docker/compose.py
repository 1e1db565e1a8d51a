"""The compose/stack file of a scenario (pure: topology + links in, a dict out).

One file serves `docker-compose up` (v1 1.29 and Compose v2) and `docker stack deploy`
(Swarm), so it keeps to what both accept (file format 3.8):
- network `cell`: bridge under compose, overlay under Swarm (each tool's default driver),
  internal (no route out), subnet 198.18.0.0/16. The v3 format has no `gateway` or fixed
  addresses that Swarm honours, so nodes find each other by service name (`server`);
  Swarm services use `endpoint_mode: dnsrr` (this kernel has no IPVS).
- `server`: the broker and the orchestrator (`testbed compose-server STATE`).
- one service per device: it shapes its own eth0 (NET_ADMIN, docker_selfshape.py) to the
  radio model's rates, then runs `testbed-agent`.
- CPU and memory limits from the profiles in `deploy.resources` (honoured by both).
- placement: `node.labels.testbed.server == true` for the server,
  `node.labels.testbed.device == true` for devices (`docker node update --label-add`).
Every node bind-mounts, read-only, the host paths of the node image (docker_image.py) and
the scenario's state directory, so those paths must exist on every Swarm node.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.emulation.docker.spec import RUN_LABEL, SUBNET

__all__ = ["ComposeNode", "compose_doc", "COMPOSE_VERSION", "NETWORK"]

COMPOSE_VERSION = "3.8"
NETWORK = "cell"


@dataclass(frozen=True)
class ComposeNode:
    node_id: str
    role: str  # "server" | "device"
    cpu_cores: float | None
    memory_mb: int | None
    command: list[str]


def _service(run_id: str, node: ComposeNode, image: str, mounts: list[tuple[str, str, bool]]) -> dict[str, Any]:
    limits: dict[str, str] = {}
    if node.cpu_cores is not None:
        limits["cpus"] = f"{node.cpu_cores:g}"
    if node.memory_mb is not None:
        limits["memory"] = f"{node.memory_mb}M"
    deploy: dict[str, Any] = {
        "endpoint_mode": "dnsrr",
        "restart_policy": {"condition": "none"},
        "placement": {"constraints": [f"node.labels.testbed.{node.role} == true"]},
    }
    if limits:
        deploy["resources"] = {"limits": limits}
    return {
        "image": image,
        "hostname": node.node_id,
        "command": list(node.command),
        "init": True,
        "cap_add": ["NET_ADMIN"],
        "labels": {RUN_LABEL: run_id, "testbed.node": node.node_id, "testbed.role": node.role},
        "environment": {"PYTHONUNBUFFERED": "1", "TESTBED_RUN": run_id, "TESTBED_NODE": node.node_id},
        "volumes": [{"type": "bind", "source": h, "target": c, "read_only": ro} for h, c, ro in mounts],
        "networks": [NETWORK],
        "deploy": deploy,
    }


def compose_doc(
    run_id: str,
    topology_name: str,
    nodes: list[ComposeNode],
    image: str,
    host_mounts: list[str],
    state_dir: Path,
) -> dict[str, Any]:
    """The whole file as a dict (yaml.safe_dump it). `state_dir` is writable for the
    server (results, broker files) and read-only for devices (their agent config)."""
    if sum(n.role == "server" for n in nodes) != 1:
        raise ValueError("a compose file needs exactly one server node")
    ro = [(p, p, True) for p in host_mounts]
    services: dict[str, Any] = {}
    for n in nodes:
        state = [(str(state_dir), str(state_dir), n.role != "server")]
        services[n.node_id] = _service(run_id, n, image, ro + state)
        if n.role == "device":
            services[n.node_id]["depends_on"] = ["server"]
    return {
        "version": COMPOSE_VERSION,
        "x-testbed": {"run": run_id, "topology": topology_name, "state_dir": str(state_dir)},
        "services": services,
        "networks": {
            NETWORK: {
                "internal": True,
                "labels": {RUN_LABEL: run_id},
                "ipam": {"config": [{"subnet": SUBNET}]},
            }
        },
    }
