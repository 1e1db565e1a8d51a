"""The compose/stack file of a scenario (pure: topology + links in, a dict out).

One file serves `docker-compose up` (v1 1.29 and Compose v2) and `docker stack deploy`
(Swarm), so it keeps to what both accept (file format 3.8):
- network `cell`: bridge under compose, overlay under Swarm (each tool's default driver),
  internal (no route out), subnet 198.18.0.0/16. The v3 format has no `gateway` or fixed
  addresses that Swarm honours, so nodes find each other by service name (`server`);
  Swarm services use `endpoint_mode: dnsrr` (this kernel has no IPVS).
- `server`: the broker (bound to the container's cell address) and the orchestrator
  (`testbed compose-server STATE`); it mounts the scenario's state directory (writable).
- one service per device: it shapes its own eth0 as root (NET_ADMIN, selfshape.py) to the
  radio model's rates, drops to its own uid and runs `testbed-agent`. Its config is a
  docker secret (`/run/secrets/agent.json`): the only file of the scenario it gets.
- every container drops every capability but those of COMPOSE_CAPS.
- CPU and memory limits from the profiles in `deploy.resources` (honoured by both).
- placement: `node.labels.testbed.server == true` for the server,
  `node.labels.testbed.device == true` for devices (`docker node update --label-add`).
Every node bind-mounts, read-only, the host paths of the node image (image.py), and the
server its state directory, so those paths must exist on the Swarm nodes that run them;
Swarm carries the devices' secrets itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.emulation.docker.spec import RUN_LABEL, SUBNET

__all__ = ["ComposeNode", "compose_doc", "COMPOSE_VERSION", "NETWORK", "COMPOSE_CAPS", "SECRET_PATH", "secret_name"]

COMPOSE_VERSION = "3.8"
NETWORK = "cell"
#: Where a device container finds its agent config (a docker secret).
SECRET_PATH = "/run/secrets/agent.json"
#: Capabilities a container keeps (every other one is dropped). A device shapes its own
#: link (NET_ADMIN), then drops to its uid (SETGID, SETUID). The server's orchestrator runs
#: as root over its state directory and hands the broker its files: the broker directory
#: goes to the mosquitto user (CHOWN, FOWNER), root still writes its config there and reads
#: files a non-root `testbed compose` made (DAC_OVERRIDE), mosquitto drops to its user
#: (SETGID, SETUID) and is stopped by a signal (KILL).
COMPOSE_CAPS = {"server": ("CHOWN", "DAC_OVERRIDE", "FOWNER", "KILL", "SETGID", "SETUID"),
                "device": ("NET_ADMIN", "SETGID", "SETUID")}


@dataclass(frozen=True)
class ComposeNode:
    node_id: str
    role: str  # "server" | "device"
    cpu_cores: float | None
    memory_mb: int | None
    command: list[str]
    config: Path | None = None  # a device's agent config on this host: its secret


def secret_name(node_id: str) -> str:
    return f"agent-{node_id}"


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
        "cap_drop": ["ALL"],
        "cap_add": list(COMPOSE_CAPS[node.role]),
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
    """The whole file as a dict (yaml.safe_dump it). `state_dir` is the server's
    (writable: results, broker files); a device gets only its config, as a secret."""
    if sum(n.role == "server" for n in nodes) != 1:
        raise ValueError("a compose file needs exactly one server node")
    ro = [(p, p, True) for p in host_mounts]
    services: dict[str, Any] = {}
    secrets: dict[str, Any] = {}
    for n in nodes:
        if n.role == "server":
            services[n.node_id] = _service(run_id, n, image, ro + [(str(state_dir), str(state_dir), False)])
            continue
        if n.config is None:
            raise ValueError(f"device {n.node_id} has no agent config")
        services[n.node_id] = _service(run_id, n, image, ro)
        services[n.node_id]["depends_on"] = ["server"]
        services[n.node_id]["secrets"] = [{"source": secret_name(n.node_id), "target": Path(SECRET_PATH).name}]
        secrets[secret_name(n.node_id)] = {"file": str(n.config)}
    return {
        "version": COMPOSE_VERSION,
        "x-testbed": {"run": run_id, "topology": topology_name, "state_dir": str(state_dir)},
        "services": services,
        "secrets": secrets,
        "networks": {
            NETWORK: {
                "internal": True,
                "labels": {RUN_LABEL: run_id},
                "ipam": {"config": [{"subnet": SUBNET}]},
            }
        },
    }
