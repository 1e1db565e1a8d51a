"""`testbed run --run ID`: a generation on a cell that `testbed up` keeps alive.

`AttachedCell` stands in for `Emulation` inside `Runner` (the attributes the runner uses:
links, nodes, cg, netem, warnings, backend, device_ids(), kill()): it reads the run's
state.json written by the supervisor and recomputes the links from the same topology and
seed. The runner then starts its own secured broker (port 1884, so that the cell's own
broker, if any, is left alone), agent template and agents, and removes only those at the
end. Part of the composition layer.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from testbed.errors import RunFailedError, TopologyError
from testbed.model.radio import compute_links
from testbed.model.topology import Topology, place

__all__ = ["AttachedCell", "ATTACH_BROKER_PORT"]

ATTACH_BROKER_PORT = 1884


class AttachedCell:
    def __init__(self, run_id: str, topo: Topology):
        from testbed.emulation import NodeState
        from testbed.emulation.cgroups import detect_cgroups
        from testbed.emulation.runs import read_state, supervisor_pid

        state = read_state(run_id)
        if not state or not state.get("ready"):
            raise RunFailedError(f"run {run_id}: not up (no ready state); start it with `testbed up FILE --run {run_id}`")
        if supervisor_pid(run_id) is None:
            raise RunFailedError(f"run {run_id}: its supervisor is gone; `testbed down --run {run_id}` cleans up")
        if state.get("seed") is not None and state["seed"] != topo.seed:
            raise TopologyError(f"run {run_id} was brought up with seed {state['seed']}, not {topo.seed}; "
                                f"pass --seed {state['seed']} (the placement and links depend on it)")
        self.run_id = run_id
        self.links = compute_links(topo, place(topo))
        by_id = {link.id: link for link in self.links}
        nodes = state.get("nodes") or []
        devs = sorted(n["id"] for n in nodes if n.get("role") == "device")
        if devs != sorted(by_id):
            raise TopologyError(f"run {run_id} has devices {devs}, the topology file {sorted(by_id)}; "
                                "give the file the run was brought up with")
        self.nodes: dict[str, Any] = {}
        for n in nodes:
            link = by_id.get(n["id"])
            self.nodes[n["id"]] = NodeState(
                n["id"], n["role"], n["netns"], n["address"], n.get("rate_up_mbps"), n.get("rate_down_mbps"),
                n.get("cpu_quota_cores"), n.get("memory_mb"), link.profile if link else topo.server.profile,
                n.get("x_m", 0.0), n.get("y_m", 0.0))
        self.cg = detect_cgroups() if any(n.cpu_quota_cores for n in self.nodes.values()) else None
        self.netem = bool(state.get("netem"))
        self.warnings = list(state.get("warnings") or [])
        self.backend = SimpleNamespace(name=state.get("backend", "netns"), host_route=bool(state.get("host_route")))
        self.broker: Any = None
        self.timings_s: dict[str, float] = {}

    def device_ids(self) -> list[str]:
        return [n.id for n in self.nodes.values() if n.role == "device"]

    async def kill(self, node_id: str) -> None:
        """Stop what runs in the node's cgroup (on an attached cell: only this run's agent)."""
        from testbed.emulation.procs import stop_pid

        if self.cg is not None:
            for pid in self.cg.pids(self.run_id, node_id):
                await stop_pid(pid, timeout_s=1.0)

    async def set_links(self, rates: dict[str, tuple[float, float]]) -> None:
        raise RunFailedError("link rates of an attached cell belong to its supervisor; use `testbed fault` or the TUI")

    def status(self) -> dict[str, Any]:
        from testbed.emulation.runs import read_state

        return read_state(self.run_id) or {}
