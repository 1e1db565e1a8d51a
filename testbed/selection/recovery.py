"""Re-selection after a failure: a chain for the generation's remaining stages, by the run's selector.

Pure. The schedule's step count is fixed when the generation starts (every message
carries it, and the scheduler's timesteps depend on it), so the remaining steps need
exactly `stages` more stages of K steps: the new chain has that many devices, chosen
among the remaining ones under what is left of the budgets. Each selector keeps its
objective:

- `dp`, `exact`: the largest total model size (the exact optimum, a 0/1 MILP with the
  chain length as an equality: the paper's DP table has no axis for it);
- `fair`: the same on sizes discounted by the energy history (`fair_weights`);
- `random`: a seeded random order, each device taken while it fits, until the chain is full;
- `greedy`: by S_j / (T_j / T_max + E_j / E_max), likewise.

No chain fits: `InfeasibleError` naming the budget that is short; the orchestrator ends the
run with it (exit 5).

`reselect_chance` keeps a chance constraint instead (a plan made with `--confidence P`):
P(the chain's summed latency draws <= T_max left) >= P, mean energy within E_max left.
`dp`, `exact` and `fair` enumerate the MILP's chains most valuable first (each rejected
chain cut off by a no-good constraint, at most MAX_CHAINS solves) until one keeps it;
`random` and `greedy` walk their order taking each device that keeps both. No chain:
`InfeasibleError`, on which the plan falls back to `reselect` (the mean-based chain, its
probability recorded): a recovery with less than P beats a failed run.
"""

from __future__ import annotations

import math
import time

import numpy as np

from testbed.errors import InfeasibleError, TopologyError
from testbed.selection import SELECTORS, DeviceCost, Selection, fair_weights, relay_order, solvers

__all__ = ["MAX_CHAINS", "Chain", "reselect", "reselect_chance"]

#: `reselect_chance` checks at most this many chains (one MILP solve each) before giving up.
MAX_CHAINS = 64


class Chain(list):
    """A re-selected chain (device ids in relay order) and what the plan knows of it."""

    p_within: float | None = None  # modelled P(the chain's latency <= the time left)
    confidence_kept: bool = True  # False: no chain kept the plan's confidence; this is the mean-based one


def reselect(
    costs: list[DeviceCost],
    stages: int,
    t_max_s: float,
    e_max_j: float,
    selector: str = "dp",
    seed: int = 0,
    history: dict[str, float] | None = None,
) -> Selection:
    """Exactly `stages` devices among `costs` (in relay order) whose stages fit the budgets left."""
    _check_request(costs, stages, t_max_s, e_max_j, selector)
    t = np.array([c.latency_s for c in costs], dtype=float)
    e = np.array([c.energy_j for c in costs], dtype=float)
    s = np.array([c.size_mb for c in costs], dtype=float)
    start = time.perf_counter()
    if selector in ("dp", "exact", "fair"):
        v = s * fair_weights(costs, history) if selector == "fair" else s
        idx = _best_chain(t, e, v, t_max_s, e_max_j, stages)
    else:
        if selector == "random":
            order = np.random.default_rng(seed).permutation(len(costs))
        else:  # greedy
            order = np.argsort(-(s / (t / t_max_s + e / e_max_j)), kind="stable")
        idx = solvers.first_fit(order, t, e, t_max_s, e_max_j)[:stages]
    solve_ms = (time.perf_counter() - start) * 1e3
    if len(idx) < stages:
        if selector in ("random", "greedy") and _best_chain(t, e, np.ones_like(t), t_max_s, e_max_j, stages).size:
            raise InfeasibleError(f"the {selector} order filled {len(idx)} of the {stages} remaining stage(s) within "
                                  f"the budget left ({t_max_s:.3f} s, {e_max_j:.1f} J); a chain exists: --selector dp "
                                  "finds it")
        raise InfeasibleError(_why_not(t, e, stages, t_max_s, e_max_j))
    chosen = relay_order([costs[int(i)] for i in idx])
    return Selection(selector=selector, t_max_s=float(t_max_s), e_max_j=float(e_max_j), devices=list(costs),
                     selected=[c.id for c in chosen], objective_mb=float(sum(c.size_mb for c in chosen)),
                     latency_s=float(sum(c.latency_s for c in chosen)), energy_j=float(sum(c.energy_j for c in chosen)),
                     solve_ms=solve_ms, chosen=chosen)


def reselect_chance(
    costs: list[DeviceCost],
    draws: np.ndarray,
    stages: int,
    t_max_s: float,
    e_max_j: float,
    confidence: float,
    selector: str = "dp",
    seed: int = 0,
    history: dict[str, float] | None = None,
    max_chains: int = MAX_CHAINS,
) -> tuple[Selection, float]:
    """Exactly `stages` devices among `costs` (in relay order) whose stage-latency draws
    (`draws`: devices x draws, in the order of `costs`) keep P(sum <= t_max_s) >= confidence,
    with mean energy <= e_max_j; (the selection, that probability). InfeasibleError: none."""
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise TopologyError(f"confidence={confidence!r} must be a probability strictly between 0 and 1")
    if draws.ndim != 2 or draws.shape[0] != len(costs):
        raise TopologyError(f"stage draws for {draws.shape[0] if draws.ndim == 2 else '?'} devices, costs for "
                            f"{len(costs)}: pass them in the same order")
    _check_request(costs, stages, t_max_s, e_max_j, selector)
    t = draws.mean(axis=1)
    e = np.array([c.energy_j for c in costs], dtype=float)
    s = np.array([c.size_mb for c in costs], dtype=float)
    start = time.perf_counter()
    if selector in ("dp", "exact", "fair"):
        v = s * fair_weights(costs, history) if selector == "fair" else s
        idx = _best_chance_chain(t, e, v, draws, t_max_s, e_max_j, stages, confidence, max_chains)
    else:
        order = (np.random.default_rng(seed).permutation(len(costs)) if selector == "random"
                 else np.argsort(-(s / (t / t_max_s + e / e_max_j)), kind="stable"))
        idx = _first_fit_chance(order, draws, e, t_max_s, e_max_j, stages, confidence)
    solve_ms = (time.perf_counter() - start) * 1e3
    if len(idx) < stages:
        raise InfeasibleError(f"no chain of {stages} device(s) keeps the {t_max_s:.3f} s left with probability "
                              f"{confidence:g} within {e_max_j:.1f} J ({selector}, {len(costs)} candidates)")
    chosen = relay_order([costs[int(i)] for i in idx])
    p = float(np.mean(draws[np.asarray(idx, dtype=np.int64)].sum(axis=0) <= t_max_s * (1 + solvers.REL_TOL)))
    return Selection(selector=selector, t_max_s=float(t_max_s), e_max_j=float(e_max_j), devices=list(costs),
                     selected=[c.id for c in chosen], objective_mb=float(sum(c.size_mb for c in chosen)),
                     latency_s=float(sum(c.latency_s for c in chosen)), energy_j=float(sum(c.energy_j for c in chosen)),
                     solve_ms=solve_ms, chosen=chosen), p


def _check_request(costs: list[DeviceCost], stages: int, t_max_s: float, e_max_j: float, selector: str) -> None:
    if selector not in SELECTORS:
        raise TopologyError(f"unknown selector {selector!r}; valid: {', '.join(SELECTORS)}")
    if stages < 1:
        raise TopologyError(f"stages={stages}: a re-selection is for at least one remaining stage")
    for name, val, unit in (("T_max", t_max_s, "s"), ("E_max", e_max_j, "J")):
        if not math.isfinite(val):
            raise TopologyError(f"{name}={val!r} must be a finite number")
        if val <= 0:
            raise InfeasibleError(f"no {name} left ({val:.3g} {unit}) for the {stages} remaining stage(s)")
    if len(costs) < stages:
        raise InfeasibleError(f"{len(costs)} device(s) remain for {stages} remaining stage(s) of K steps")


def _best_chance_chain(t: np.ndarray, e: np.ndarray, v: np.ndarray, draws: np.ndarray, t_max: float, e_max: float,
                       n: int, confidence: float, max_chains: int) -> np.ndarray:
    """The most valuable n items whose mean costs fit and whose draws keep the chance
    constraint: the MILP's chains in order of value, each rejected one cut off."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # here: ~0.5 s to import, only on a failure

    cuts: list[np.ndarray] = []
    for _ in range(max_chains):
        rows = [LinearConstraint(np.vstack([t, e]), -np.inf, [t_max, e_max]),
                LinearConstraint(np.ones((1, t.size)), n, n)]
        if cuts:
            rows.append(LinearConstraint(np.vstack(cuts), -np.inf, n - 1))
        res = milp(c=-v, constraints=rows, integrality=np.ones(t.size), bounds=Bounds(0, 1),
                   options={"mip_rel_gap": 0.0})
        if res.x is None:
            break
        chosen = np.flatnonzero(res.x > 0.5)
        ok = chosen.size == n and solvers.fits(t[chosen].sum(), e[chosen].sum(), t_max, e_max)
        if ok and np.mean(draws[chosen].sum(axis=0) <= t_max * (1 + solvers.REL_TOL)) >= confidence:
            return chosen
        cut = np.zeros(t.size)
        cut[chosen] = 1.0
        cuts.append(cut)
    return np.zeros(0, dtype=np.int64)


def _first_fit_chance(order: np.ndarray, draws: np.ndarray, e: np.ndarray, t_max: float, e_max: float, n: int,
                      confidence: float) -> np.ndarray:
    chosen: list[int] = []
    total, spent = np.zeros(draws.shape[1]), 0.0
    for i in order:
        if len(chosen) == n:
            break
        keeps = np.mean(total + draws[i] <= t_max * (1 + solvers.REL_TOL)) >= confidence
        if keeps and spent + e[i] <= e_max * (1 + solvers.REL_TOL):
            chosen.append(int(i))
            total, spent = total + draws[i], spent + e[i]
    return np.array(chosen, dtype=np.int64)


def _best_chain(t: np.ndarray, e: np.ndarray, v: np.ndarray, t_max: float, e_max: float, n: int) -> np.ndarray:
    """max sum(v) over exactly n items with sum(t) <= t_max and sum(e) <= e_max (HiGHS);
    empty when no n items fit. Items dominated by enough others never need to be offered."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # here: ~0.5 s to import, only on a failure

    keep = solvers.prune_dominated(t, e, v, t_max, e_max)
    if keep.size < n:
        return np.zeros(0, dtype=np.int64)
    tk, ek, vk = t[keep], e[keep], v[keep]
    res = milp(c=-vk, constraints=[LinearConstraint(np.vstack([tk, ek]), -np.inf, [t_max, e_max]),
                                   LinearConstraint(np.ones((1, keep.size)), n, n)],
               integrality=np.ones(keep.size), bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
    if res.x is None:
        return np.zeros(0, dtype=np.int64)
    chosen = keep[np.flatnonzero(res.x > 0.5)]
    # HiGHS accepts violations up to its feasibility tolerance: the exact sums decide
    if chosen.size != n or not solvers.fits(t[chosen].sum(), e[chosen].sum(), t_max, e_max):
        return np.zeros(0, dtype=np.int64)
    return chosen


def _why_not(t: np.ndarray, e: np.ndarray, n: int, t_max: float, e_max: float) -> str:
    """Which budget a chain of n stages misses, from the n quickest and the n most frugal devices."""
    fastest, frugal = float(np.sort(t)[:n].sum()), float(np.sort(e)[:n].sum())
    what = f"no chain of {n} device(s) fits the budget left ({t_max:.3f} s, {e_max:.1f} J)"
    if fastest > t_max * (1 + solvers.REL_TOL):
        return f"{what}: the {n} quickest need {fastest:.3f} s"
    if frugal > e_max * (1 + solvers.REL_TOL):
        return f"{what}: the {n} most frugal need {frugal:.1f} J"
    return f"{what}: each budget alone admits {n} devices, both together do not"
