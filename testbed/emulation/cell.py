"""The `Cell` protocol: everything above the emulation layer sees an emulated cell through it.

Implemented in full by `Emulation` (a cell this process makes, on the netns or docker
backend), `AttachedCell` (a cell that `testbed up` keeps alive, reached through its
supervisor's control socket) and `DeployedCell` (the server container's view of a
compose/Swarm deployment). See docs/design.md, "The cell".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from testbed.model.impairments import LinkImpairment
from testbed.model.names import MQTT_PORT
from testbed.model.radio import DeviceLink

__all__ = ["Cell", "NodeState", "NodeJoin", "BrokerSettings", "LinkUpdate", "NODE_STATES", "restart_broker"]

#: up: running and linked; down: its link is cut; killed: its processes were stopped.
NODE_STATES = ("up", "down", "killed")
NodeStateName = Literal["up", "down", "killed"]


@dataclass
class NodeState:
    """One node as the cell holds it now (rates and quota change at run time)."""

    id: str
    role: str  # "server" | "device"
    netns: str | None  # a path usable with `nsenter --net=` (None: not reachable from here)
    address: str | None
    rate_up_mbps: float | None
    rate_down_mbps: float | None
    cpu_quota_cores: float | None
    memory_mb: int | None
    profile: str
    x_m: float
    y_m: float
    state: NodeStateName = "up"
    host: str | None = None  # the cluster node it runs on (a Swarm cell); None: this machine
    #: a Swarm device's clock minus the run owner's, and the round trip it was measured
    #: over (its error is at most half of it); None where both share one clock
    clock_offset_s: float | None = None
    clock_rtt_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        doc = {"id": self.id, "role": self.role, "netns": self.netns, "address": self.address,
               "rate_up_mbps": self.rate_up_mbps, "rate_down_mbps": self.rate_down_mbps,
               "cpu_quota_cores": self.cpu_quota_cores, "memory_mb": self.memory_mb, "profile": self.profile,
               "x_m": self.x_m, "y_m": self.y_m, "state": self.state, "host": self.host}
        if self.clock_offset_s is not None:
            doc |= {"clock_offset_s": self.clock_offset_s, "clock_rtt_s": self.clock_rtt_s}
        return doc

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NodeState:
        return cls(d["id"], d["role"], d.get("netns"), d.get("address"), d.get("rate_up_mbps"),
                   d.get("rate_down_mbps"), d.get("cpu_quota_cores"), d.get("memory_mb"), d.get("profile", ""),
                   float(d.get("x_m") or 0.0), float(d.get("y_m") or 0.0), d.get("state", "up"), d.get("host"),
                   d.get("clock_offset_s"), d.get("clock_rtt_s"))


@dataclass(frozen=True)
class NodeJoin:
    """What a process must enter to run inside a node: its network namespace, one
    `cgroup.procs` file per hierarchy (writing "0" moves the writer), and the other
    namespaces of a container (mount, UTS, IPC). Paths, opened by whoever forks. `env`:
    what the process's environment must hold for the node's limits that live there (its
    GPU share under CUDA MPS, emulation/gpu.py; set before its first CUDA call)."""

    netns: str | None
    cgroup_procs: tuple[str, ...] = ()
    extra_ns: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"netns": self.netns, "cgroup_procs": list(self.cgroup_procs), "extra_ns": list(self.extra_ns),
                "env": dict(self.env)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NodeJoin:
        return cls(d.get("netns"), tuple(d.get("cgroup_procs") or ()), tuple(d.get("extra_ns") or ()),
                   {str(k): str(v) for k, v in (d.get("env") or {}).items()})


@dataclass(frozen=True)
class BrokerSettings:
    """What a broker is started with; its handle keeps them, so a restart needs nothing else.

    With `watch_password_file` the broker has two listeners: the cell listener on `port`,
    where every client id is replaced by its account's name (no connection can be taken
    over with another's client id), and the watch listener on `watch_port` (`port` + 1)
    for the read-only accounts of those files, which may connect several at once
    (relay/security.py names the accounts)."""

    password_file: Path | None = None
    acl_file: Path | None = None
    max_message_bytes: int | None = None
    port: int = MQTT_PORT
    prefer: str = "mosquitto"  # "mosquitto" (when installed) or "amqtt" (anonymous cells only)
    watch_password_file: Path | None = None
    watch_acl_file: Path | None = None

    @property
    def watch_port(self) -> int | None:
        return self.port + 1 if self.watch_password_file is not None else None

    def to_json(self) -> dict[str, Any]:
        path = (lambda p: str(p) if p else None)  # noqa: E731
        return {"password_file": path(self.password_file), "acl_file": path(self.acl_file),
                "max_message_bytes": self.max_message_bytes, "port": self.port, "prefer": self.prefer,
                "watch_password_file": path(self.watch_password_file), "watch_acl_file": path(self.watch_acl_file)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BrokerSettings:
        path = (lambda k: Path(d[k]) if d.get(k) else None)  # noqa: E731
        return cls(path("password_file"), path("acl_file"), d.get("max_message_bytes"), int(d.get("port") or MQTT_PORT),
                   d.get("prefer") or "mosquitto", path("watch_password_file"), path("watch_acl_file"))


@dataclass(frozen=True)
class LinkUpdate:
    """One mobility tick: new positions and rates of every device."""

    t_s: float
    devices: tuple[dict[str, Any], ...] = field(default=())  # {id, x_m, y_m, distance_m, rate_up_mbps, rate_down_mbps}


@runtime_checkable
class Cell(Protocol):
    """One emulated edge cell: a server node, device nodes, their links and the broker."""

    run_id: str
    backend_name: str  # "netns", "docker", "compose"
    links: list[DeviceLink]  # the radio model's links at the start
    nodes: dict[str, NodeState]
    warnings: list[str]

    # description --------------------------------------------------------------------
    def device_ids(self) -> list[str]: ...
    async def refresh(self) -> None:
        """`nodes` as the cell holds them now (a no-op where this process owns the cell)."""
        ...
    def status(self) -> dict[str, Any]:
        """The `testbed status --json` document (nodes with their state)."""
        ...

    # links --------------------------------------------------------------------------
    async def set_links(self, rates: dict[str, tuple[float, float]]) -> None: ...
    async def set_link(self, device_id: str, up_mbps: float, down_mbps: float) -> None: ...
    @property
    def impairments(self) -> dict[str, LinkImpairment]:
        """Every device's delay, jitter and loss per direction, as applied now."""
        ...

    async def set_impairments(self, impairments: dict[str, LinkImpairment]) -> None:
        """Change devices' delay, jitter and loss live (docs/links.md)."""
        ...

    async def cut_link(self, device_id: str) -> None: ...
    async def restore_link(self, device_id: str) -> None: ...
    def on_update(self, callback: Callable[[LinkUpdate], None]) -> None:
        """Call `callback` at every mobility tick (positions and rates)."""
        ...

    # compute and processes ----------------------------------------------------------
    async def set_cpu(self, node_id: str, cpu_cores: float) -> None: ...
    async def join(self, node_id: str) -> NodeJoin: ...
    async def spawn(self, node_id: str, argv: list[str], env: dict[str, str] | None = None,
                    log_path: Path | None = None) -> int: ...
    async def kill(self, node_id: str) -> None:
        """Stop every process in the node; its state becomes `killed`."""
        ...

    async def revive(self, node_id: str) -> None:
        """A killed (or cut) node is `up` again: link restored; processes are the caller's to start."""
        ...

    # broker -------------------------------------------------------------------------
    @property
    def broker(self) -> Any:  # BrokerHandle | None
        ...

    async def start_broker(self, settings: BrokerSettings) -> Any: ...
    async def stop_broker(self) -> None: ...
    async def restart_broker(self, down_s: float = 0.0) -> Any: ...

    # lifetime -----------------------------------------------------------------------
    async def close(self) -> None: ...


async def restart_broker(cell: Cell, down_s: float = 0.0) -> Any:
    """Stop the cell's broker, wait `down_s`, start it again with the settings it keeps
    (what every cell's `restart_broker` does)."""
    import asyncio

    from testbed.errors import ResourceError

    if cell.broker is None:
        raise ResourceError("restart_broker: this cell has no broker")
    settings = cell.broker.settings
    await cell.stop_broker()
    await asyncio.sleep(down_s)
    return await cell.start_broker(settings)
