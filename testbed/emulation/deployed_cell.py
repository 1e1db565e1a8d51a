"""`DeployedCell`: the `Cell` as the server container of a compose/Swarm deployment sees it.

In `docker-compose up` or `docker stack deploy` each device is a service that shapes its
own link and runs its own agent (testbed/emulation/docker/compose.py writes them): the
server container runs the broker and the run owner, and reaches the devices only over
MQTT. So this cell's links and broker are real; the operations that need a hand on a
device (kill, spawn, link and CPU changes) raise `ResourceError` saying what to use
instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.emulation.broker import BrokerHandle, broker_status, start_broker
from testbed.emulation.cell import BrokerSettings, LinkUpdate, NodeJoin, NodeState, restart_broker
from testbed.errors import ResourceError
from testbed.model.impairments import LinkImpairment
from testbed.model.names import SERVER_ID, check_run_id
from testbed.model.radio import DeviceLink

__all__ = ["DeployedCell"]


class DeployedCell:
    def __init__(self, run_id: str, links: list[DeviceLink], state_dir: Path, host: str, server_profile: str = ""):
        self.run_id = check_run_id(run_id)
        self.backend_name = "compose"
        self.links = list(links)
        self.state_dir = Path(state_dir)
        self.host = host
        self.warnings = ["compose/Swarm deployment: every device shapes its own link; the cell's shared capacity "
                         "and mobility are not applied"]
        self.nodes: dict[str, NodeState] = {
            SERVER_ID: NodeState(SERVER_ID, "server", None, host, None, None, None, None, server_profile, 0.0, 0.0)}
        for lk in self.links:
            self.nodes[lk.id] = NodeState(lk.id, "device", None, None, lk.rate_up_mbps, lk.rate_down_mbps, None, None,
                                          lk.profile, lk.x_m, lk.y_m)
        self._broker: BrokerHandle | None = None
        self.broker_error: str | None = None

    def _elsewhere(self, what: str, instead: str) -> ResourceError:
        return ResourceError(f"{what}: in a compose/Swarm deployment the devices are other containers; {instead}")

    def device_ids(self) -> list[str]:
        return [lk.id for lk in self.links]

    async def refresh(self) -> None:
        """This process owns the cell: `nodes` is always current."""

    def status(self) -> dict[str, Any]:
        b = self._broker
        return {"run": self.run_id, "backend": self.backend_name, "netem": False, "warnings": list(self.warnings),
                "host_route": False, "cell": {"shared_capacity": False}, "mobility": False,
                **broker_status(b, self.broker_error),
                "nodes": [n.to_json() for n in self.nodes.values()]}

    async def set_links(self, rates: dict[str, tuple[float, float]]) -> None:
        raise self._elsewhere("set_links", "each device service shapes its own eth0 at start")

    async def set_link(self, device_id: str, up_mbps: float, down_mbps: float) -> None:
        await self.set_links({device_id: (up_mbps, down_mbps)})

    @property
    def impairments(self) -> dict[str, LinkImpairment]:
        return {lk.id: LinkImpairment() for lk in self.links}

    async def set_impairments(self, impairments: dict[str, LinkImpairment]) -> None:
        raise self._elsewhere("set_impairments", "each device service would need netem in its own container")

    async def cut_link(self, device_id: str) -> None:
        raise self._elsewhere("cut_link", f"use `docker network disconnect` on {device_id}'s container")

    async def restore_link(self, device_id: str) -> None:
        raise self._elsewhere("restore_link", f"use `docker network connect` on {device_id}'s container")

    def on_update(self, callback: Callable[[LinkUpdate], None]) -> None:
        """No mobility in compose deployments: rates stay at the initial positions."""

    async def set_cpu(self, node_id: str, cpu_cores: float) -> None:
        raise self._elsewhere("set_cpu", f"use `docker update --cpus {cpu_cores:g}` on {node_id}'s container")

    async def join(self, node_id: str) -> NodeJoin:
        raise self._elsewhere("join", "each device service starts its own agent")

    async def spawn(self, node_id: str, argv: list[str], env: dict[str, str] | None = None,
                    log_path: Path | None = None) -> int:
        raise self._elsewhere("spawn", "each device service starts its own agent")

    async def kill(self, node_id: str) -> None:
        raise self._elsewhere("kill", f"use `docker kill` on {node_id}'s container")

    async def revive(self, node_id: str) -> None:
        raise self._elsewhere("revive", f"use `docker start` on {node_id}'s container")

    @property
    def broker(self) -> BrokerHandle | None:
        return self._broker

    async def start_broker(self, settings: BrokerSettings | None = None) -> BrokerHandle:
        """The broker in this (the server's) container, on the cell address."""
        if self._broker is None:
            try:
                self._broker = await start_broker(None, self.host, self.state_dir / "broker",
                                                  settings or BrokerSettings())
            except Exception as e:
                self.broker_error = str(e)  # the status says the broker is down, and why
                raise
            self.broker_error = None
        return self._broker

    async def stop_broker(self) -> None:
        if self._broker is not None:
            handle, self._broker = self._broker, None
            await handle.stop()

    async def restart_broker(self, down_s: float = 0.0) -> BrokerHandle:
        """Stop the broker, wait `down_s`, start it again with the same settings."""
        return await restart_broker(self, down_s)

    async def close(self) -> None:
        await self.stop_broker()
