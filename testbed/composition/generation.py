"""One generation on an open cell: plan, execute, score — and its outputs.

    request  -> the method's plan (PlanContext: the cell's links and impairments now, the
                budgets, the energy history, how many runs each agent's connection has
                carried (connections.py), the delay path, and the confidence asked for)
             -> faults scheduled (the scenario's `faults:`, `--fail` on a selected device)
             -> the method's execute (RunContext: this generation, frozen, and the run
                owner's services)
             -> the image decoded and scored against its reference, the energy history
                added to, the result document written (results.py)

The run owner (session.py) hands it its parts: the cell's `Rig`, the event log, the edge
server's model and references, and itself as the methods' `RunServices`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.composition.cells import Rig
from testbed.composition.connections import ConnectionLedger, carried
from testbed.composition.events import EventLog, publishing
from testbed.composition.faults import FaultInjector
from testbed.composition.online import down_agents
from testbed.composition.results import RunResult, copy_logs, result_document, score_image, write_result
from testbed.composition.server_side import ServerSide
from testbed.composition.startup import StartupClock
from testbed.errors import TestbedError, TopologyError
from testbed.methods import method as method_spec
from testbed.methods.base import Collaboration, PlanContext, RunContext, RunServices
from testbed.model.radio import DeviceLink
from testbed.model.topology import FaultSpec, Topology

__all__ = ["Request", "Generation"]


@dataclass(frozen=True)
class Request:
    """What one generation is asked to do."""

    topology: Topology
    collab: Collaboration
    t_max_s: float
    e_max_j: float
    faults: tuple[FaultSpec, ...]
    fail: str | None
    out_dir: Path | None
    startup: StartupClock
    confidence: float | None = None  # keep P(latency <= T_max) >= it (methods that take one)


class Generation:
    def __init__(self, rig: Rig, events: EventLog, server: ServerSide, services: RunServices):
        self.rig, self.events, self.server, self.services = rig, events, server, services

    def current_links(self) -> list[DeviceLink]:
        """The devices that can take part — not killed, their agents not `down` (silent while
        their process runs: the up cell's keeper, online.Liveness) — with the rates the cell
        applies now."""
        cell = self.rig.cell
        down = down_agents(self.rig.state_dir)
        return [link.model_copy(update={"rate_up_mbps": cell.nodes[link.id].rate_up_mbps or link.rate_up_mbps,
                                        "rate_down_mbps": cell.nodes[link.id].rate_down_mbps or link.rate_down_mbps})
                for link in cell.links if cell.nodes[link.id].state != "killed" and link.id not in down]

    async def run(self, req: Request) -> RunResult:
        cell, topo, out = self.rig.cell, req.topology, req.out_dir
        if req.confidence is not None:  # a method that cannot keep it is refused before anything is opened
            method_spec(req.collab.name).check_confidence(req.confidence)
        if out is not None:
            (out / "logs").mkdir(parents=True, exist_ok=True)
        await cell.refresh()  # an attached cell: its nodes' states and rates as they are now
        self.events.open(out / "events.jsonl" if out is not None else None)
        reference = self.server.reference(topo, req.startup)  # in the background; needed after the generation
        await self.server.model()  # (its imports first: plans may import diffusers too)
        # (an attached cell's status is a blocking call to its owner, which may be waiting on
        # this very loop — a worker's generation: so off the loop)
        delay_path = await asyncio.to_thread(_delay_path, cell)
        ledger = ConnectionLedger(self.rig.state_dir)
        with req.startup.span("plan"):
            history = self.rig.history.load() if self.rig.history is not None else {}
            plan = req.collab.plan(PlanContext(topo, self.current_links(), req.t_max_s, req.e_max_j, topo.seed,
                                               history, cell.impairments, confidence=req.confidence,
                                               messages_before=ledger.counts(self._agent_pids()),
                                               delay_path=delay_path))
        specs = _fault_specs(req, plan)
        settings = self.services.relay_settings("events") if self.rig.credentials is not None and cell.broker else None
        async with publishing(self.events, settings, self.services.in_server_ns):
            self.services.emit("selection", None, method=req.collab.name, selector=req.collab.selector,
                               strategy=req.collab.selector, selected=plan.selected,
                               predicted_latency_s=plan.predicted_latency_s,
                               predicted_energy_j=plan.predicted_energy_j, plan=plan.to_json())
            injector = FaultInjector(cell, self.services.emit, {c.id: c for c in plan.costs}, specs)
            self.events.listeners.append(injector.feed)
            try:
                ctx = RunContext(self.rig.run_id, topo, req.t_max_s, req.e_max_j, self.services)
                outcome = await req.collab.execute(ctx, plan)
            except TestbedError as e:
                self.services.emit("run_failed", None, error=str(e), exit_code=e.exit_code)  # observers stop following
                raise
            finally:
                self.events.listeners.remove(injector.feed)
                await injector.close()
            image = await asyncio.to_thread(score_image, self.server.loaded(), outcome.latent, out, await reference)
            if self.rig.history is not None:
                self.rig.history.add(outcome.energy_by_device)
            ledger.add(carried(outcome.stages, outcome.recovered), self._agent_pids())
            doc = result_document(run_id=self.rig.run_id, ctx=ctx, collab=req.collab, plan=plan, outcome=outcome,
                                  image=image, faults=[f.to_json() for f in injector.injected], cell=cell,
                                  model=self.server.loaded(), startup=req.startup, confidence=req.confidence)
            self.services.emit("run_finished", None, latency_s=outcome.latency_s, energy_j=outcome.energy_j,
                               recovered=len(outcome.recovered), ms_ssim=image["ms_ssim"], image=image["image"])
        if out is not None:
            write_result(out, doc)
            copy_logs(cell, self.rig.state_dir, out / "logs")
        self.events.close()
        return RunResult(doc, out, image.get("array"))


    def _agent_pids(self) -> dict[str, int]:
        """device -> its agent's pid (which connection it is); {} where agents are someone else's."""
        agents = self.rig.agents
        try:
            return agents.pids() if agents is not None else {}
        except (OSError, TestbedError):  # an up cell's supervisor that does not answer: counts start afresh
            return {}


def _delay_path(cell: Any) -> str:
    """The cell's delay path (netem | nfqueue+iptables | none), as its status says."""
    return str((cell.status().get("impairments") or {}).get("path", "none"))


def _fault_specs(req: Request, plan: Any) -> list[FaultSpec]:
    """The scenario's faults, and `--fail DEV` as a kill halfway through its stage's computation."""
    specs = list(req.faults)
    if req.fail is not None:
        if req.fail not in plan.selected:
            raise TopologyError(f"--fail {req.fail}: not a selected device (selected: {', '.join(plan.selected)}); "
                                "pick one of those")
        specs = [f for f in specs if not (f.kind == "kill" and f.device == req.fail)]
        specs.append(FaultSpec(kind="kill", device=req.fail, at_stage=plan.selected.index(req.fail)))
    return specs
