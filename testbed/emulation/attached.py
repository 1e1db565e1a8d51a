"""`AttachedCell`: a cell that `testbed up` keeps alive, driven through its control socket.

The supervisor that owns the cell serves `cell_handlers(cell)` on
`/run/testbed/<run>/control.sock`; `AttachedCell` implements the `Cell` protocol by
asking it. Every change (rates, cut links, CPU quotas, kills, the broker) is made by the
process that owns the kernel objects, so a client never rebuilds them from state files,
and it works the same for netns and docker cells.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.emulation.broker import BrokerHandle
from testbed.emulation.cell import BrokerSettings, Cell, LinkUpdate, NodeJoin, NodeState
from testbed.emulation.control import Handler, call, call_sync, control_path
from testbed.errors import ResourceError
from testbed.model.impairments import LinkImpairment
from testbed.model.names import check_run_id
from testbed.model.radio import DeviceLink

__all__ = ["AttachedCell", "cell_handlers", "control_path"]


def cell_handlers(cell: Cell) -> dict[str, Handler]:
    """The control ops of a cell (the supervisor's side of `AttachedCell`). Ops that change
    the cell answer with its new status document."""

    def describe() -> dict[str, Any]:
        broker = cell.broker
        return {"run": cell.run_id, "backend": cell.backend_name, "links": [lk.model_dump() for lk in cell.links],
                "status": cell.status(), "broker": broker.to_json() if broker is not None else None,
                "impairments": {dev: imp.to_json() for dev, imp in cell.impairments.items()}}

    def changes(fn: Callable[..., Any]) -> Handler:
        async def handler(**kw: Any) -> dict[str, Any]:
            await fn(**kw)
            return describe()

        return handler

    async def set_links(rates: dict[str, list[float]]) -> None:
        await cell.set_links({dev: (float(r[0]), float(r[1])) for dev, r in rates.items()})

    async def set_impairments(impairments: dict[str, dict[str, Any]]) -> None:
        await cell.set_impairments({dev: LinkImpairment.from_json(v) for dev, v in impairments.items()})

    async def join(node_id: str) -> dict[str, Any]:
        return (await cell.join(node_id)).to_json()

    async def spawn(node_id: str, argv: list[str], env: dict[str, str] | None = None,
                    log_path: str | None = None) -> int:
        return await cell.spawn(node_id, list(argv), env, Path(log_path) if log_path else None)

    async def start_broker(settings: dict[str, Any] | None = None) -> None:
        await cell.start_broker(BrokerSettings.from_json(settings or {}))

    async def status() -> dict[str, Any]:
        return describe()

    return {
        "describe": status,
        "set_links": changes(set_links),
        "set_link": changes(cell.set_link),
        "set_impairments": changes(set_impairments),
        "cut_link": changes(cell.cut_link),
        "restore_link": changes(cell.restore_link),
        "set_cpu": changes(cell.set_cpu),
        "kill": changes(cell.kill),
        "revive": changes(cell.revive),
        "join": join,
        "spawn": spawn,
        "start_broker": changes(start_broker),
        "stop_broker": changes(cell.stop_broker),
        "restart_broker": changes(cell.restart_broker),
    }


class AttachedCell:
    """The `Cell` of a running `testbed up`, through its supervisor. Use
    `await AttachedCell.connect(run_id)`; `close()` leaves the cell up."""

    def __init__(self, run_id: str, doc: dict[str, Any]):
        self.run_id = check_run_id(run_id)
        self.path = control_path(run_id)
        self.backend_name = doc["backend"]
        self.links = [DeviceLink(**lk) for lk in doc["links"]]
        self.nodes: dict[str, NodeState] = {}
        self.warnings: list[str] = []
        self._broker: BrokerHandle | None = None
        self._status: dict[str, Any] = {}
        self._impairments: dict[str, LinkImpairment] = {}
        self._callbacks: list[Callable[[LinkUpdate], None]] = []
        self._poller: asyncio.Task | None = None
        self._apply(doc)

    @classmethod
    async def connect(cls, run_id: str) -> AttachedCell:
        path = control_path(run_id)
        if not path.exists():
            raise ResourceError(f"run {run_id} is not up (no control socket at {path}); "
                                f"start it with `testbed up FILE --run {run_id}`")
        return cls(run_id, await call(path, "describe"))

    def _apply(self, doc: dict[str, Any]) -> dict[str, Any]:
        self._status = doc["status"]
        self.nodes = {n["id"]: NodeState.from_json(n) for n in self._status["nodes"]}
        self.warnings = list(self._status.get("warnings") or [])
        self._broker = BrokerHandle.from_json(doc["broker"]) if doc.get("broker") else None
        self._impairments = {dev: LinkImpairment.from_json(v) for dev, v in (doc.get("impairments") or {}).items()}
        return doc

    async def _change(self, op: str, **args: Any) -> None:
        self._apply(await call(self.path, op, **args))

    async def refresh(self) -> None:
        await self._change("describe")

    # description --------------------------------------------------------------------
    def device_ids(self) -> list[str]:
        return [n.id for n in self.nodes.values() if n.role == "device"]

    def status(self) -> dict[str, Any]:
        return self._apply(call_sync(self.path, "describe"))["status"]

    # links --------------------------------------------------------------------------
    async def set_links(self, rates: dict[str, tuple[float, float]]) -> None:
        await self._change("set_links", rates={d: list(r) for d, r in rates.items()})

    async def set_link(self, device_id: str, up_mbps: float, down_mbps: float) -> None:
        await self._change("set_link", device_id=device_id, up_mbps=up_mbps, down_mbps=down_mbps)

    @property
    def impairments(self) -> dict[str, LinkImpairment]:
        return dict(self._impairments)

    async def set_impairments(self, impairments: dict[str, LinkImpairment]) -> None:
        await self._change("set_impairments", impairments={d: i.to_json() for d, i in impairments.items()})

    async def cut_link(self, device_id: str) -> None:
        await self._change("cut_link", device_id=device_id)

    async def restore_link(self, device_id: str) -> None:
        await self._change("restore_link", device_id=device_id)

    def on_update(self, callback: Callable[[LinkUpdate], None]) -> None:
        """Mobility ticks, seen from here: the supervisor's positions and rates, polled once a second."""
        self._callbacks.append(callback)
        if self._poller is None and self._status.get("mobility"):
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(ResourceError):
                await self.refresh()
                rows = tuple({"id": n.id, "x_m": n.x_m, "y_m": n.y_m, "rate_up_mbps": n.rate_up_mbps,
                              "rate_down_mbps": n.rate_down_mbps} for n in self.nodes.values() if n.role == "device")
                for cb in self._callbacks:
                    cb(LinkUpdate(loop.time() - t0, rows))

    # compute and processes ----------------------------------------------------------
    async def set_cpu(self, node_id: str, cpu_cores: float) -> None:
        await self._change("set_cpu", node_id=node_id, cpu_cores=cpu_cores)

    async def join(self, node_id: str) -> NodeJoin:
        return NodeJoin.from_json(await call(self.path, "join", node_id=node_id))

    async def spawn(self, node_id: str, argv: list[str], env: dict[str, str] | None = None,
                    log_path: Path | None = None) -> int:
        return int(await call(self.path, "spawn", node_id=node_id, argv=list(argv), env=env,
                              log_path=str(log_path) if log_path else None))

    async def kill(self, node_id: str) -> None:
        await self._change("kill", node_id=node_id)

    async def revive(self, node_id: str) -> None:
        await self._change("revive", node_id=node_id)

    # broker -------------------------------------------------------------------------
    @property
    def broker(self) -> BrokerHandle | None:
        return self._broker

    async def start_broker(self, settings: BrokerSettings | None = None) -> BrokerHandle | None:
        await self._change("start_broker", settings=(settings or BrokerSettings()).to_json())
        return self._broker

    async def stop_broker(self) -> None:
        await self._change("stop_broker")

    async def restart_broker(self, down_s: float = 0.0) -> BrokerHandle | None:
        await self._change("restart_broker", down_s=down_s)
        return self._broker

    # lifetime -----------------------------------------------------------------------
    async def close(self) -> None:
        """Stop following the cell; the cell itself stays up (`testbed down` removes it)."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(BaseException):
                await self._poller
            self._poller = None
