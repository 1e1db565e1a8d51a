"""The collaboration-strategy interface: plan from costs and budgets, execute on the run owner.

A strategy is how devices collaborate on one generation (multi-stage relay, split,
patch-parallel, ...). `plan` is pure: the topology, the devices' current links, the
budgets and the energy history in; the devices, their roles and the predicted costs out.
`execute` runs the plan through `RunContext` — what the run owner lends it: agents, the
broker, the run's credentials, the event log, the edge server's namespace and model — and
returns an `Outcome` with per-stage records. The run owner turns every outcome into the
same result document. See docs/design.md, "Collaboration strategies".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from testbed.model.impairments import LinkImpairment
from testbed.model.radio import DeviceLink
from testbed.model.topology import Topology

__all__ = ["PlanContext", "Plan", "Outcome", "RelaySettings", "RunContext", "Collaboration"]


@dataclass(frozen=True)
class PlanContext:
    topology: Topology
    links: list[DeviceLink]  # candidate devices (not killed), with the rates the cell applies now
    t_max_s: float
    e_max_j: float
    seed: int
    history: dict[str, float] = field(default_factory=dict)  # energy each device has spent so far (J)
    impairments: dict[str, LinkImpairment] = field(default_factory=dict)  # delay, jitter, loss applied now


class Plan(Protocol):
    """What a strategy decided: the devices in order and the predicted totals."""

    selected: list[str]
    predicted_latency_s: float
    predicted_energy_j: float

    def to_json(self) -> dict[str, Any]: ...


@dataclass
class Outcome:
    """A generation as executed: per-stage records in the result document's shape."""

    stages: list[dict[str, Any]]  # each with device, steps, t_down_s, t_cmp_s, t_up_s, energy_j, overrun_s, predicted
    latent: Any
    latency_s: float
    energy_j: float
    total_steps: int
    relay_order: list[str]
    energy_by_device: dict[str, float]
    recovered: list[dict[str, Any]] = field(default_factory=list)
    rejected_results: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific result fields


@dataclass(frozen=True)
class RelaySettings:
    """How the edge server's orchestrator reaches the broker."""

    run: str
    broker_host: str
    broker_port: int
    username: str
    password: str
    max_message_bytes: int

    def login(self) -> dict[str, Any]:
        """The orchestrators' connection keywords (run, broker_host, broker_port, username, password)."""
        return {"run": self.run, "broker_host": self.broker_host, "broker_port": self.broker_port,
                "username": self.username, "password": self.password}


class RunContext(Protocol):
    """What the run owner lends a strategy's `execute` (testbed/composition/session.py)."""

    run_id: str
    topology: Topology
    t_max_s: float
    e_max_j: float

    def relay_settings(self) -> RelaySettings: ...
    async def ensure_agents(self, devices: list[str]) -> None:
        """Agents of these devices are running and online (bounded wait)."""
        ...
    async def server_model(self) -> Any:
        """The edge server's fp32 model (relay/stage.py StageModel): initial latent, conditioning, decoding."""
        ...
    def power(self) -> dict[str, Any]:
        """device -> DevicePower (compute, tx, rx watts) from the profiles."""
        ...
    def emit(self, etype: str, device: str | None = None, **data: Any) -> None: ...
    def event_sink(self) -> Callable[[dict[str, Any]], None]:
        """Where an orchestrator, on its own thread, hands its events (thread-safe)."""
        ...
    async def in_server_ns(self, factory: Callable[[], Any]) -> Any:
        """Await `factory()` on an event loop inside the edge server's namespace."""
        ...


class Collaboration(Protocol):
    method: ClassVar[str]
    strategy: str  # the device-selection strategy the plan uses (or how it picks devices)

    def plan(self, ctx: PlanContext) -> Plan: ...
    async def execute(self, run: RunContext, plan: Plan) -> Outcome: ...
