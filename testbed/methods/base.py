"""The interface of a collaboration method: plan from costs and budgets, execute on a run.

A method is how devices collaborate on one generation (multi-stage relay, split,
patch-parallel, ...), registered once in `testbed/methods/__init__.py`:

    class Collaboration(Protocol):
        name: ClassVar[str]                 # the registry's key: "multistage", "split", ...
        selector: str                       # how its plan picks devices ("dp", "best-pair", ...)
        def plan(self, ctx: PlanContext) -> Plan: ...
        async def execute(self, run: RunContext, plan: Plan) -> Outcome: ...

`plan` is pure: the topology, the devices' current links and impairments, the budgets,
the energy history, the connections' use and (where the method takes one) a confidence in;
the devices, their roles and the predicted costs out. `execute` runs the plan
through `RunContext` — one generation's frozen inputs plus what the run owner lends it
(agents, the broker login, the event log, the edge server's namespace and model) — and
returns an `Outcome` with per-stage records. The run owner turns every outcome into the
same result document. See docs/design.md, "Methods".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from testbed.model.impairments import LinkImpairment
from testbed.model.radio import DeviceLink
from testbed.model.topology import Topology
from testbed.relay.orchestrator import DevicePower, Job, RelaySettings, Timing

__all__ = ["PlanContext", "Plan", "Outcome", "RunServices", "RunContext", "Collaboration", "energy_by_device"]


@dataclass(frozen=True)
class PlanContext:
    topology: Topology
    links: list[DeviceLink]  # candidate devices (not killed), with the rates the cell applies now
    t_max_s: float
    e_max_j: float
    seed: int
    history: dict[str, float] = field(default_factory=dict)  # energy each device has spent so far (J)
    impairments: dict[str, LinkImpairment] = field(default_factory=dict)  # delay, jitter, loss applied now
    #: keep P(latency <= T_max) >= confidence under the modelled distributions (None: the mean-based plan);
    #: only methods whose registry line says `takes_confidence` get one
    confidence: float | None = None
    #: per device, how many runs its agent's connection has carried on this cell (its TCP state, docs/links.md)
    messages_before: dict[str, int] = field(default_factory=dict)
    delay_path: str = "none"  # the cell's delay path: netem | nfqueue+iptables | none (the delayer's per-pass cost)


class Plan(Protocol):
    """What a method decided: the devices in order, the predicted totals, the per-device
    costs it was made from, and whether a device lost mid-run can be replaced."""

    selected: list[str]
    predicted_latency_s: float  # the mean
    predicted_energy_j: float
    # Optional (read with getattr by the run owner): `predicted_latency_quantiles_s`, the
    # {"p10", "p50", "p90", "p95"} of the latency's modelled distribution (a plan made on
    # point values only has none: null in result.json), and `confidence`, the P it keeps.

    @property
    def costs(self) -> list[Any]:
        """The selection's `DeviceCost` records the plan was made from ([] when it has none):
        what fault scheduling times a `--fail` kill from."""
        ...

    @property
    def can_recover(self) -> bool: ...

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


def energy_by_device(pairs: list[tuple[str, float]]) -> dict[str, float]:
    """Energy per device from (device, joules) pairs (what the run adds to the history)."""
    out: dict[str, float] = {}
    for dev, j in pairs:
        out[dev] = out.get(dev, 0.0) + j
    return out


class RunServices(Protocol):
    """What the run owner lends a method's `execute` (composition/session.py)."""

    def relay_settings(self, role: str = "server") -> RelaySettings:
        """How a role (server: the orchestrator) reaches the broker, as its own account."""
        ...
    async def ensure_agents(self, devices: list[str], *, spare: list[str] | tuple[str, ...] = ()) -> None:
        """Agents of these devices are running and online (bounded wait); `spare` (a
        recovery's pool, best first) start too, without being waited for."""
        ...
    async def server_model(self) -> Any:
        """The edge server's fp32 model (relay/stage.py StageModel): initial latent, conditioning, decoding."""
        ...
    def power(self) -> dict[str, DevicePower]:
        """device -> its profile's compute, tx and rx power."""
        ...
    def emit(self, etype: str, device: str | None = None, **data: Any) -> None: ...
    def event_sink(self) -> Callable[[dict[str, Any]], None]:
        """Where an orchestrator, on its own thread, hands its events (thread-safe)."""
        ...
    async def in_server_ns(self, factory: Callable[[], Any]) -> Any:
        """Await `factory()` on an event loop inside the edge server's namespace."""
        ...


@dataclass(frozen=True)
class RunContext:
    """One generation, frozen: its scenario, budgets and seed, and the run owner's services."""

    run_id: str
    topology: Topology
    t_max_s: float
    e_max_j: float
    services: RunServices

    @property
    def seed(self) -> int:
        return self.topology.seed

    async def job(self) -> Job:
        """What the orchestrator makes: the server's model, the prompt, the seed, the scheduler."""
        wl = self.topology.workload
        return Job(await self.services.server_model(), wl.prompt, self.topology.seed, wl.scheduler, wl.payload_bytes)

    def timing(self, devices: int) -> Timing:
        return Timing.for_compute(self.topology.workload.compute, devices)

    async def orchestrate(self, make: Callable[[RelaySettings, Job, dict[str, DevicePower]], Any]) -> Any:
        """Build an orchestrator with `make(settings, job, power)` and run it in the edge
        server's namespace; what its `run()` returns."""
        job = await self.job()
        settings, power = self.services.relay_settings(), self.services.power()
        return await self.services.in_server_ns(lambda: make(settings, job, power).run())


class Collaboration(Protocol):
    name: ClassVar[str]
    selector: str  # the device selector the plan uses, or how it picks devices itself

    def plan(self, ctx: PlanContext) -> Plan: ...
    async def execute(self, run: RunContext, plan: Any) -> Outcome: ...
