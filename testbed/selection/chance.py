"""Chance-constrained device selection: the largest total model size whose modelled latency
stays within T_max with probability at least P; energy at its mean. Pure.

P(sum_j T_j <= T_max) is read off the stage-latency draws of stochastic.py: every
device's draws are in an order of their own, so summing the chosen devices' rows draw by
draw gives draws of the run's latency, and the share within T_max is the probability.
One draw matrix serves every candidate set (common random numbers: two plans are compared
on the same draws).

How the constraint enters the paper's DP (`dp`, `fair`) — check and tighten, solved once:

1. the paper's DP (k-dominance pruning and the table, solvers.dp_table, unchanged) on the
   stages' mean latencies: its table holds, for every tightened latency budget T' (each
   latency cell, below T_max and past it), the best answer whose rounded costs fit T' and
   whose exact energy fits E_max;
2. those answers are checked against the chance constraint by summing draws, most valuable
   first, in small batches; the first that keeps it is taken — T tightened until P holds,
   without solving again;
3. a local search over every device on exact mean energies and the draws (add one device,
   swap one for one) takes back what the tightened answers miss (a device the pruning on
   means dropped, a slower but steadier one).

`exact` enumerates every subset on the same draws (the reference; small instances), and
`random` / `greedy` walk their order taking each device that keeps both constraints.
Without a confidence, selection is `select(...)` as it was.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from testbed.errors import InfeasibleError, TopologyError
from testbed.selection import SELECTORS, Selection, fair_weights, relay_order
from testbed.selection import solvers
from testbed.selection.costs import DeviceCost
from testbed.selection.solvers import DEFAULT_GRID, REL_TOL
from testbed.selection.stochastic import RUN_QUANTILES, Distribution, StageDistribution

__all__ = ["EXACT_MAX_DEVICES", "ChanceSelection", "exact_chance", "latency_draws", "p_within", "select_chance"]

#: `exact` enumerates 2^n subsets of the candidates left after pruning.
EXACT_MAX_DEVICES = 22
_BATCH = 32  # table answers checked per matrix product
_SWAP_OUTSIDERS = 64  # the local search's swaps consider this many of the most valuable outsiders


@dataclass(frozen=True)
class ChanceSelection:
    """A selection that keeps P(latency <= T_max) >= confidence under the modelled draws."""

    selection: Selection  # the chosen devices in relay order; latency_s and energy_j: point-model sums
    confidence: float
    p_within: float  # modelled P(total latency <= T_max) of the chosen plan
    latency: Distribution  # the plan's total latency (draws)
    checked: int  # candidate plans whose probability was computed

    @property
    def latency_quantiles_s(self) -> dict[str, float]:
        """result.json's `predicted_latency_quantiles_s`: {"p10", "p50", "p90", "p95"}."""
        return self.latency.quantiles(RUN_QUANTILES)

    def to_json(self) -> dict[str, Any]:
        return {**self.selection.to_json(), "confidence": self.confidence, "p_within": self.p_within,
                "latency_mean_s": self.latency.mean(), "latency_quantiles_s": self.latency_quantiles_s}


def latency_draws(stages: Sequence[StageDistribution]) -> np.ndarray:
    """The devices' stage-latency draws as rows of one matrix (devices x draws)."""
    return np.stack([s.latency.samples for s in stages])


def p_within(draws: np.ndarray, chosen: Sequence[int] | np.ndarray, t_max_s: float) -> float:
    """P(sum of the chosen devices' latencies <= t_max_s) under the draws."""
    idx = np.asarray(chosen, dtype=np.int64)
    total = draws[idx].sum(axis=0) if idx.size else np.zeros(draws.shape[1])
    return float(np.mean(total <= t_max_s * (1 + REL_TOL)))


def select_chance(
    costs: list[DeviceCost],
    stages: Sequence[StageDistribution] | np.ndarray,
    t_max_s: float,
    e_max_j: float,
    confidence: float,
    selector: str = "dp",
    seed: int = 0,
    history: dict[str, float] | None = None,
    grid: int | tuple[int, int] = DEFAULT_GRID,
) -> ChanceSelection:
    """Choose devices among `costs` so that P(latency <= T_max) >= confidence and the mean
    energy <= E_max, maximizing the total model size (module docstring).

    `stages`: the devices' StageDistributions in the order of `costs` (or their draw
    matrix, devices x draws). Raises TopologyError on a bad confidence, selector or budget,
    InfeasibleError when no device alone keeps both constraints."""
    if selector not in SELECTORS:
        raise TopologyError(f"unknown selector {selector!r}; valid: {', '.join(SELECTORS)}")
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise TopologyError(f"confidence={confidence!r} must be a probability strictly between 0 and 1, e.g. 0.9")
    for name, val in (("T_max", t_max_s), ("E_max", e_max_j)):
        if not math.isfinite(val) or val <= 0:
            raise TopologyError(f"{name}={val!r} must be a positive number")
    draws = stages if isinstance(stages, np.ndarray) else latency_draws(stages)
    if draws.ndim != 2 or draws.shape[0] != len(costs):
        raise TopologyError(f"stage draws for {draws.shape[0] if draws.ndim == 2 else '?'} devices, costs for "
                            f"{len(costs)}: pass them in the same order")
    e = np.array([c.energy_j for c in costs], dtype=float)
    v = np.array([c.size_mb for c in costs], dtype=float)
    alone = np.mean(draws <= t_max_s * (1 + REL_TOL), axis=1)
    _check_any_keeps(costs, alone, e, t_max_s, e_max_j, confidence)
    start = time.perf_counter()
    if selector in ("dp", "fair"):
        weight = v * fair_weights(costs, history) if selector == "fair" else v
        idx, checked = _dp_chance(draws, e, weight, t_max_s, e_max_j, confidence, grid)
    elif selector == "exact":
        idx, checked = exact_chance(draws, e, v, t_max_s, e_max_j, confidence)
    else:
        if selector == "random":
            order = np.random.default_rng(seed).permutation(len(costs))
        else:  # greedy: the point model's density, mean latencies
            t = draws.mean(axis=1)
            order = np.argsort(-(v / (t / t_max_s + e / e_max_j)), kind="stable")
        idx, checked = _first_fit(order, draws, e, t_max_s, e_max_j, confidence)
    solve_ms = (time.perf_counter() - start) * 1e3
    chosen = relay_order([costs[int(i)] for i in idx])
    total = draws[np.asarray(idx, dtype=np.int64)].sum(axis=0)
    selection = Selection(
        selector=selector, t_max_s=float(t_max_s), e_max_j=float(e_max_j), devices=list(costs),
        selected=[c.id for c in chosen], objective_mb=float(sum(c.size_mb for c in chosen)),
        latency_s=float(sum(c.latency_s for c in chosen)), energy_j=float(sum(c.energy_j for c in chosen)),
        solve_ms=solve_ms, chosen=chosen)
    return ChanceSelection(selection, float(confidence), p_within(draws, idx, t_max_s), Distribution(total), checked)


def _keeps(total: np.ndarray, t_max: float, confidence: float) -> np.ndarray:
    """Which rows of summed draws keep P(total <= t_max) >= confidence."""
    return np.mean(total <= t_max * (1 + REL_TOL), axis=-1) >= confidence


def _dp_chance(draws: np.ndarray, e: np.ndarray, v: np.ndarray, t_max: float, e_max: float, confidence: float,
               grid: int | tuple[int, int]) -> tuple[np.ndarray, int]:
    lim_e = e_max * (1 + REL_TOL)
    if e.sum() <= lim_e and _keeps(draws.sum(axis=0), t_max, confidence):
        return np.arange(e.size), 1  # everyone keeps it: nothing to choose
    t = draws.mean(axis=1)
    keep = solvers.prune_dominated(t, e, v, t_max, e_max)  # on means: the table's items (the search sees all)
    table = solvers.dp_table(t[keep], e[keep], v[keep], t_max, e_max, grid)
    # the tightened budgets: for every latency cell a, the best answer within a cells whose
    # exact energy fits E_max; distinct answers, most valuable (largest a) first
    value, sum_e = table.state[0], table.state[3]
    score = np.where(sum_e <= lim_e, value, -np.inf)
    b = score.argmax(axis=1)
    a = np.arange(score.shape[0])
    col = score[a, b]
    a, b, col = a[::-1], b[::-1], col[::-1]
    fresh = np.isfinite(col) & (col > 0) & np.concatenate([[True], col[1:] < col[:-1] - table.tol])
    a, b = a[fresh], b[fresh]
    best: np.ndarray | None = None
    checked = 0
    x = draws[keep]
    for lo in range(0, a.size, _BATCH):
        answers = table.backtrack(a[lo: lo + _BATCH], b[lo: lo + _BATCH])
        member = np.zeros((len(answers), keep.size))
        for r, ans in enumerate(answers):
            member[r, ans] = 1.0
        good = np.flatnonzero(_keeps(member @ x, t_max, confidence))
        checked += len(answers)
        if good.size:
            best = keep[answers[int(good[0])]]
            break
    if best is None:  # no tightened answer keeps it: start the search from the best single device
        alone = np.flatnonzero((e <= lim_e) & _keeps(draws, t_max, confidence))
        best = alone[[int(np.argmax(v[alone]))]]
    local, more = _improve(best, draws, e, v, t_max, e_max, confidence)
    return local, checked + more


def prune_stochastic(draws: np.ndarray, e: np.ndarray, v: np.ndarray, t_max: float, e_max: float) -> np.ndarray:
    """solvers.prune_dominated with "no slower" as first-order stochastic dominance of the
    latency draws: j is dropped when at least m others have no higher energy, no smaller
    value and sorted draws nowhere above j's (ties broken by index); m bounds how many
    devices any plan with a chance of keeping T_max holds (by their fastest draws)."""
    fastest = draws.min(axis=1)
    alone = np.flatnonzero((fastest <= t_max * (1 + REL_TOL)) & (e <= e_max * (1 + REL_TOL)))
    if alone.size <= 1:
        return alone
    m = solvers.max_count(fastest[alone], e[alone], t_max, e_max)
    if m >= alone.size:
        return alone
    srt = np.sort(draws[alone], axis=1)
    mean, ee, vv = srt.mean(axis=1), e[alone], v[alone]
    kept = np.ones(alone.size, dtype=bool)
    for j in range(alone.size):
        cand = np.flatnonzero((mean <= mean[j]) & (ee <= ee[j]) & (vv >= vv[j]))
        cand = cand[cand != j]
        if cand.size < m:
            continue
        below = np.all(srt[cand] <= srt[j], axis=1)
        strict = np.any(srt[cand] < srt[j], axis=1) | (ee[cand] < ee[j]) | (vv[cand] > vv[j]) | (cand < j)
        kept[j] = int((below & strict).sum()) < m
    return alone[kept]


def _improve(chosen: np.ndarray, x: np.ndarray, e: np.ndarray, v: np.ndarray, t_max: float, e_max: float,
             confidence: float, rounds: int = 50) -> tuple[np.ndarray, int]:
    """Add one device or swap one for one while the total value grows and both constraints hold."""
    sel = np.zeros(e.size, dtype=bool)
    sel[chosen] = True
    lim_e = e_max * (1 + REL_TOL)
    checked = 0
    for _ in range(rounds):
        total, se = x[sel].sum(axis=0), e[sel].sum()
        out, ins = np.flatnonzero(~sel), np.flatnonzero(sel)
        if out.size == 0:
            break
        out = out[np.argsort(-v[out], kind="stable")[:_SWAP_OUTSIDERS]]
        moves: list[tuple[float, list[int], list[int]]] = []
        fits = (se + e[out] <= lim_e) & _keeps(total + x[out], t_max, confidence)
        checked += out.size
        gain = np.where(fits, v[out], -np.inf)
        j = int(gain.argmax())
        moves.append((float(gain[j]), [], [int(out[j])]))
        if ins.size:
            ne = se - e[ins][:, None] + e[out][None, :]
            useful = (v[out][None, :] > v[ins][:, None]) & (ne <= lim_e)
            if useful.any():
                ii, jj = np.nonzero(useful)
                keeps = _keeps(total[None, :] - x[ins[ii]] + x[out[jj]], t_max, confidence)
                checked += ii.size
                gain = np.where(keeps, v[out[jj]] - v[ins[ii]], -np.inf)
                k = int(gain.argmax())
                moves.append((float(gain[k]), [int(ins[ii[k]])], [int(out[jj[k]])]))
        best_gain, drop, add = max(moves, key=lambda m: m[0])
        if best_gain <= 1e-12 * max(1.0, float(v[sel].sum())):
            break
        sel[drop] = False
        sel[add] = True
    return np.flatnonzero(sel), checked


def exact_chance(draws: np.ndarray, e: np.ndarray, v: np.ndarray, t_max: float, e_max: float,
                 confidence: float) -> tuple[np.ndarray, int]:
    """The optimum by enumeration on the same draws: every subset of the (stochastically
    pruned) candidates, most valuable first, until one keeps both constraints."""
    keep = prune_stochastic(draws, e, v, t_max, e_max)
    n = keep.size
    if n > EXACT_MAX_DEVICES:
        raise TopologyError(f"exact chance-constrained selection enumerates subsets: {n} candidates after pruning, "
                            f"at most {EXACT_MAX_DEVICES}; use selector dp")
    if n == 0:
        return keep, 0
    x, ek, vk = draws[keep], e[keep], v[keep]
    bits = ((np.arange(1, 2**n)[:, None] >> np.arange(n)[None, :]) & 1).astype(bool)
    value, energy = bits @ vk, bits @ ek
    fastest = bits @ x.min(axis=1)
    possible = np.flatnonzero((energy <= e_max * (1 + REL_TOL)) & (fastest <= t_max * (1 + REL_TOL)))
    order = possible[np.argsort(-value[possible], kind="stable")]
    checked = 0
    for lo in range(0, order.size, 1024):
        rows = order[lo: lo + 1024]
        good = np.flatnonzero(_keeps(bits[rows].astype(float) @ x, t_max, confidence))
        checked += rows.size
        if good.size:
            top = value[rows[good[0]]]
            ties = rows[good[value[rows[good]] >= top - 1e-9 * max(1.0, top)]]
            # among equally valuable plans, the likelier one
            p = np.mean(bits[ties].astype(float) @ x <= t_max * (1 + REL_TOL), axis=1)
            return keep[np.flatnonzero(bits[ties[int(np.argmax(p))]])], checked
    return np.zeros(0, dtype=np.int64), checked


def _first_fit(order: np.ndarray, draws: np.ndarray, e: np.ndarray, t_max: float, e_max: float,
               confidence: float) -> tuple[np.ndarray, int]:
    chosen: list[int] = []
    total, se = np.zeros(draws.shape[1]), 0.0
    for i in order:
        if se + e[i] <= e_max * (1 + REL_TOL) and _keeps(total + draws[i], t_max, confidence):
            chosen.append(int(i))
            total, se = total + draws[i], se + e[i]
    return np.array(chosen, dtype=np.int64), len(order)


def _check_any_keeps(costs: list[DeviceCost], alone: np.ndarray, e: np.ndarray, t_max: float, e_max: float,
                     confidence: float) -> None:
    if not costs:
        raise InfeasibleError("no candidate devices to select from")
    ok = (alone >= confidence) & (e <= e_max * (1 + REL_TOL))
    if ok.any():
        return
    frugal_ok = e <= e_max * (1 + REL_TOL)
    if not frugal_ok.any():
        j = int(np.argmin(e))
        raise InfeasibleError(f"E_max {e_max:g} J is too small: the most frugal device ({costs[j].id}) needs "
                              f"{e[j]:.3g} J on average; raise --emax")
    j = int(np.flatnonzero(frugal_ok)[np.argmax(alone[frugal_ok])])
    raise InfeasibleError(
        f"no device keeps T_max {t_max:g} s with probability {confidence:g}: the likeliest within E_max, "
        f"{costs[j].id}, does with {alone[j]:.3g}; raise --tmax or lower --confidence")

