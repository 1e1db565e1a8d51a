"""Device selection (paper section IV-A): which devices run a stage, and in what order.

Pure. Maximize the total model size sum S_j subject to sum T_j <= T_max and
sum E_j <= E_max, where T_j = T_down + T_cmp + T_up and E_j likewise (`costs.py`).

Selectors (`select(..., selector=)`), the device-selection algorithms:
- `dp`: the paper's constraint-discretized DP (`solvers.dp`), plus exact k-dominance
  pruning before it and an exact-cost add/swap local search after it;
- `exact`: the MILP optimum (HiGHS), the reference the DP is measured against;
- `random`: the paper's "w/o DS": a seeded random order, each device taken while it fits;
- `greedy`: devices by S_j / (T_j / T_max + E_j / E_max), each taken while it fits;
- `fair`: `dp` on sizes discounted by the energy each device has already spent
  (`history`): S'_j = S_j / (1 + FAIR_BETA * h_j / mean(h)); a device that has spent the
  average energy counts a third, a fresh one fully, so repeated selections spread the load.

Relay order of the chosen devices: larger models first — the early, high-noise steps
form the image's structure and gain most from capacity; ties go to the faster device,
then the id. Costs do not depend on the order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from testbed.errors import InfeasibleError, TopologyError
from testbed.model.names import SELECTORS
from testbed.selection import solvers
from testbed.selection.costs import DEFAULT_LINK_EFFICIENCY, DeviceCost, device_costs, model_size_mb
from testbed.selection.solvers import DEFAULT_GRID

__all__ = [
    "DEFAULT_GRID",
    "DEFAULT_LINK_EFFICIENCY",
    "FAIR_BETA",
    "SELECTORS",
    "STRATEGIES",
    "DeviceCost",
    "Selection",
    "device_costs",
    "fair_weights",
    "model_size_mb",
    "relay_order",
    "select",
]

STRATEGIES = SELECTORS  # the older name (`--strategy`, result.json `strategy`)

#: Strength of the fairness discount: weight 1 / (1 + FAIR_BETA * h_j / mean(h)).
#: 2: on a 4-device cell whose largest model is 4x the next ones (topologies/small.yaml),
#: 1 left the chain unchanged over five runs; 2 rotates it (max/mean energy 2.35 vs dp's 2.67).
FAIR_BETA = 2.0


@dataclass(frozen=True)
class Selection:
    """The chosen devices (in relay order) among all candidates, and what they cost."""

    selector: str
    t_max_s: float
    e_max_j: float
    devices: list[DeviceCost]
    selected: list[str]
    objective_mb: float
    latency_s: float
    energy_j: float
    solve_ms: float
    chosen: list[DeviceCost] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The `testbed select --json` document."""
        return {
            "t_max_s": self.t_max_s,
            "e_max_j": self.e_max_j,
            "selector": self.selector,
            "strategy": self.selector,  # the older name, kept for scripts
            "devices": [
                {
                    "id": d.id,
                    "size_mb": d.size_mb,
                    "latency_s": d.latency_s,
                    "energy_j": d.energy_j,
                    "t_down_s": d.t_down_s,
                    "t_cmp_s": d.t_cmp_s,
                    "t_up_s": d.t_up_s,
                }
                for d in self.devices
            ],
            "selected": list(self.selected),
            "objective_mb": self.objective_mb,
            "latency_s": self.latency_s,
            "energy_j": self.energy_j,
            "solve_ms": self.solve_ms,
        }


def relay_order(chosen: list[DeviceCost]) -> list[DeviceCost]:
    """Larger models first; then the faster device; then the id."""
    return sorted(chosen, key=lambda d: (-d.size_mb, d.latency_s, d.id))


def fair_weights(costs: list[DeviceCost], history: dict[str, float] | None, beta: float = FAIR_BETA) -> np.ndarray:
    """Per-device value multipliers of the `fair` selector (1 when nobody has spent anything)."""
    h = np.array([max(0.0, float((history or {}).get(c.id, 0.0))) for c in costs])
    mean = h.mean() if h.size else 0.0
    if mean <= 0:
        return np.ones(len(costs))
    return 1.0 / (1.0 + beta * h / mean)


def select(
    costs: list[DeviceCost],
    t_max_s: float,
    e_max_j: float,
    selector: str = "dp",
    seed: int = 0,
    history: dict[str, float] | None = None,
    grid: int | tuple[int, int] = DEFAULT_GRID,
) -> Selection:
    """Choose devices among `costs` (any subset of a topology's) under the two budgets.

    Raises InfeasibleError, naming the budget that is too small and by how much, when not
    even one device fits; TopologyError on a bad selector or budget.
    """
    if selector not in SELECTORS:
        raise TopologyError(f"unknown selector {selector!r}; valid: {', '.join(SELECTORS)}")
    for name, val in (("T_max", t_max_s), ("E_max", e_max_j)):
        if not math.isfinite(val):
            raise TopologyError(f"{name}={val!r} must be a finite number")
        if val <= 0:  # e.g. a recovery whose remaining budget is spent
            raise InfeasibleError(f"{name} {val:g} leaves no budget: no device can run a stage")
    ids = [c.id for c in costs]
    if len(set(ids)) != len(ids):
        raise TopologyError(f"duplicate device ids among the candidates: {sorted({i for i in ids if ids.count(i) > 1})}")
    _check_any_fits(costs, t_max_s, e_max_j)
    t = np.array([c.latency_s for c in costs], dtype=float)
    e = np.array([c.energy_j for c in costs], dtype=float)
    s = np.array([c.size_mb for c in costs], dtype=float)
    start = time.perf_counter()
    if selector == "dp":
        idx = _dp(t, e, s, t_max_s, e_max_j, grid)
    elif selector == "fair":
        idx = _dp(t, e, s * fair_weights(costs, history), t_max_s, e_max_j, grid)
    elif selector == "exact":
        idx = solvers.exact(t, e, s, t_max_s, e_max_j)
    elif selector == "random":
        idx = solvers.first_fit(np.random.default_rng(seed).permutation(len(costs)), t, e, t_max_s, e_max_j)
    else:  # greedy
        density = s / (t / t_max_s + e / e_max_j)
        idx = solvers.first_fit(np.argsort(-density, kind="stable"), t, e, t_max_s, e_max_j)
    solve_ms = (time.perf_counter() - start) * 1e3
    chosen = relay_order([costs[int(i)] for i in idx])
    return Selection(
        selector=selector,
        t_max_s=float(t_max_s),
        e_max_j=float(e_max_j),
        devices=list(costs),
        selected=[c.id for c in chosen],
        objective_mb=float(sum(c.size_mb for c in chosen)),
        latency_s=float(sum(c.latency_s for c in chosen)),
        energy_j=float(sum(c.energy_j for c in chosen)),
        solve_ms=solve_ms,
        chosen=chosen,
    )


def _dp(t: np.ndarray, e: np.ndarray, v: np.ndarray, t_max: float, e_max: float, grid: int | tuple[int, int]) -> np.ndarray:
    if solvers.fits(t.sum(), e.sum(), t_max, e_max):
        return np.arange(t.size)  # everyone fits: nothing to choose
    keep = solvers.prune_dominated(t, e, v, t_max, e_max)
    local = solvers.dp(t[keep], e[keep], v[keep], t_max, e_max, grid)
    local = solvers.improve(local, t[keep], e[keep], v[keep], t_max, e_max)
    return keep[local]


def _up(x: float) -> str:
    """x rounded UP to 3 significant digits: a budget that really admits x."""
    scale = 10 ** (math.floor(math.log10(abs(x))) - 2) if x else 1.0
    return f"{math.ceil(x / scale) * scale:.6g}"


def _check_any_fits(costs: list[DeviceCost], t_max: float, e_max: float) -> None:
    if not costs:
        raise InfeasibleError("no candidate devices to select from")
    if any(solvers.fits(c.latency_s, c.energy_j, t_max, e_max) for c in costs):
        return
    fastest = min(costs, key=lambda c: c.latency_s)
    frugal = min(costs, key=lambda c: c.energy_j)
    t_short = fastest.latency_s - t_max
    e_short = frugal.energy_j - e_max
    if t_short > 0 and e_short > 0:
        raise InfeasibleError(
            f"both budgets are too small: T_max {t_max:g} s is {t_short:.3g} s short of the fastest device "
            f"({fastest.id}, {fastest.latency_s:.3g} s) and E_max {e_max:g} J is {e_short:.3g} J short of the "
            f"most frugal one ({frugal.id}, {frugal.energy_j:.3g} J); raise --tmax and --emax"
        )
    if t_short > 0:
        raise InfeasibleError(
            f"T_max {t_max:g} s is too small by {t_short:.3g} s: the fastest device ({fastest.id}) needs "
            f"{fastest.latency_s:.3g} s; raise --tmax to at least {_up(fastest.latency_s)}"
        )
    if e_short > 0:
        raise InfeasibleError(
            f"E_max {e_max:g} J is too small by {e_short:.3g} J: the most frugal device ({frugal.id}) needs "
            f"{frugal.energy_j:.3g} J; raise --emax to at least {_up(frugal.energy_j)}"
        )
    # each budget alone admits a device, but no device fits both: name the nearest miss
    def shortfall(c: DeviceCost) -> float:
        return max(c.latency_s / t_max, c.energy_j / e_max)

    near = min(costs, key=shortfall)
    dt, de = near.latency_s - t_max, near.energy_j - e_max
    which = (
        f"T_max {t_max:g} s is {dt:.3g} s short" if dt > 0 else f"E_max {e_max:g} J is {de:.3g} J short"
    )
    raise InfeasibleError(
        f"no device fits both budgets: the nearest, {near.id} ({near.latency_s:.3g} s, {near.energy_j:.3g} J), "
        f"misses because {which}; raise that budget"
    )
