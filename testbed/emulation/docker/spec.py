"""What the docker backend asks the daemon for, as plain data (pure; tested without docker).

`NodeSpec` -> `container_plan()` -> the keyword arguments of the docker SDK's low-level
`create_container` / `create_host_config` / endpoint config, so a unit test can check the
CPU, memory, GPU, label and address choices without a daemon. Names carry the run id:
containers `tb-<run>-<node>`, network `tb-<run>`, bridge interface `tb<run>br`.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from testbed.errors import ResourceError

__all__ = [
    "RUN_LABEL",
    "NODE_LABEL",
    "ROLE_LABEL",
    "SUBNET",
    "GATEWAY",
    "SERVER_ADDRESS",
    "NODE_CAPS",
    "DEVICE_USER",
    "NodeSpec",
    "ContainerPlan",
    "GpuHost",
    "network_name",
    "bridge_name",
    "container_name",
    "CPU_PERIOD_US",
    "cpu_quota_us",
    "detect_gpus",
    "container_plan",
    "network_plan",
]

RUN_LABEL = "testbed.run"
NODE_LABEL = "testbed.node"
ROLE_LABEL = "testbed.role"
SUBNET = "198.18.0.0/16"
GATEWAY = "198.18.255.254"
SERVER_ADDRESS = "198.18.0.1"
MPS_PIPE_DIR = "/tmp/nvidia-mps"
_IFNAMSIZ = 15

#: Capabilities a node container keeps (every other one is dropped). The host shapes every
#: link and forks the agents into the containers, each already its own unprivileged uid,
#: so a device container needs none and its own processes run as nobody. The server's
#: broker starts as root, reads its config in the mosquitto user's 0700 directory
#: (DAC_READ_SEARCH) and drops to that user (SETGID, SETUID).
NODE_CAPS = {"server": ("DAC_READ_SEARCH", "SETGID", "SETUID"), "device": ()}
#: The user of a device container's own processes (its init, `docker exec`).
DEVICE_USER = "65534:65534"


@dataclass(frozen=True)
class NodeSpec:
    """One node of the emulated cell: the edge server or a device."""

    node_id: str
    role: str  # "server" | "device"
    address: str
    cpu_cores: float | None = None
    memory_mb: int | None = None
    gpu_share_pct: int | None = None  # CUDA MPS active-thread percentage, where a GPU exists
    gpu_env: dict[str, str] = field(default_factory=dict)  # the run's MPS environment for it (emulation/gpu.py)
    pids_max: int | None = None  # processes + threads in the container (docker pids_limit)


@dataclass(frozen=True)
class GpuHost:
    """What the host offers: GPU device nodes and the NVIDIA container hook, and MPS."""

    count: int = 0
    toolkit: bool = False
    mps_pipe_dir: str | None = None

    @property
    def usable(self) -> bool:
        return self.count > 0 and self.toolkit


@dataclass(frozen=True)
class ContainerPlan:
    name: str
    image: str
    command: list[str]
    hostname: str
    labels: dict[str, str]
    environment: dict[str, str]
    host_config: dict
    network: str
    ipv4_address: str
    binds: list[tuple[str, str, bool]] = field(default_factory=list)  # (host, container, read_only)
    user: str | None = None  # None: the image's (root)


def network_name(run_id: str) -> str:
    return f"tb-{run_id}"


def bridge_name(run_id: str) -> str:
    name = f"tb{run_id}br"
    if len(name) > _IFNAMSIZ:
        raise ResourceError(f"run id {run_id!r} is too long for the bridge name {name!r} (at most 11 characters)")
    return name


def container_name(run_id: str, node_id: str) -> str:
    return f"tb-{run_id}-{node_id}"


CPU_PERIOD_US = 100_000


def cpu_quota_us(cpu_cores: float) -> int:
    """`--cpus` as a CFS quota per 100 ms period (what `docker update` can change later);
    at least 1 ms, the kernel's floor."""
    return max(1000, round(cpu_cores * CPU_PERIOD_US))


def detect_gpus(dev: Path = Path("/dev")) -> GpuHost:
    """NVIDIA GPUs (/dev/nvidiaN), the container toolkit's hook, a running MPS daemon."""
    count = sum(1 for p in dev.glob("nvidia[0-9]*") if p.name[6:].isdigit())
    toolkit = shutil.which("nvidia-container-cli") is not None or shutil.which("nvidia-container-runtime-hook") is not None
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", MPS_PIPE_DIR)
    mps = pipe if Path(pipe, "control").exists() else None
    return GpuHost(count, toolkit, mps)


def network_plan(run_id: str) -> dict:
    """Arguments of `networks.create`: an internal bridge (no route out) on 198.18.0.0/16
    whose host side is .255.254, so that .1 is free for the edge server."""
    return dict(
        name=network_name(run_id),
        driver="bridge",
        internal=True,
        labels={RUN_LABEL: run_id},
        options={"com.docker.network.bridge.name": bridge_name(run_id)},
        subnet=SUBNET,
        gateway=GATEWAY,
    )


def container_plan(
    run_id: str,
    node: NodeSpec,
    image: str,
    mounts: list[tuple[str, str, bool]],
    gpus: GpuHost = GpuHost(),
) -> ContainerPlan:
    """The container of `node`: limits from its profile, the run's labels, its address,
    only the capabilities of NODE_CAPS, no_new_privs, a device's processes as nobody.

    The container's main process is an idle `sleep` under docker's init; the testbed
    starts the broker in the server with `docker exec` and forks the agents into the
    devices (agents.py) once the links are shaped.
    """
    ipaddress.IPv4Address(node.address)
    if ipaddress.IPv4Address(node.address) not in ipaddress.IPv4Network(SUBNET):
        raise ResourceError(f"node {node.node_id}: address {node.address} is outside {SUBNET}")
    env: dict[str, str] = {"TESTBED_RUN": run_id, "TESTBED_NODE": node.node_id, "PYTHONUNBUFFERED": "1"}
    host_config: dict = dict(
        init=True,
        network_mode=network_name(run_id),
        cap_drop=["ALL"],
        cap_add=list(NODE_CAPS[node.role]),
        security_opt=["no-new-privileges"],
        restart_policy={"Name": "no"},
        log_config={"Type": "json-file", "Config": {"max-size": "1m", "max-file": "1"}},
    )
    if node.cpu_cores is not None:
        host_config["cpu_period"] = CPU_PERIOD_US
        host_config["cpu_quota"] = cpu_quota_us(node.cpu_cores)
    if node.pids_max is not None:
        host_config["pids_limit"] = node.pids_max
    if node.memory_mb is not None:
        host_config["mem_limit"] = f"{node.memory_mb}m"
        host_config["memswap_limit"] = f"{node.memory_mb}m"  # no swap beyond the profile's memory
    if gpus.usable and node.gpu_share_pct is not None:
        host_config["device_requests"] = [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(node.gpu_share_pct)
        env.update(node.gpu_env)  # the run's own daemon, where it started one
        pipe = node.gpu_env.get("CUDA_MPS_PIPE_DIRECTORY") or gpus.mps_pipe_dir
        if pipe is not None:
            # MPS clients reach the control daemon through its pipe directory and SysV IPC
            host_config["ipc_mode"] = "host"
            env["CUDA_MPS_PIPE_DIRECTORY"] = pipe
            mounts = [*mounts, (pipe, pipe, False)]
    return ContainerPlan(
        name=container_name(run_id, node.node_id),
        image=image,
        command=["/usr/bin/sleep", "infinity"],
        hostname=node.node_id,
        labels={RUN_LABEL: run_id, NODE_LABEL: node.node_id, ROLE_LABEL: node.role},
        environment=env,
        host_config=host_config,
        network=network_name(run_id),
        ipv4_address=node.address,
        binds=list(mounts),
        user=DEVICE_USER if node.role == "device" else None,
    )
