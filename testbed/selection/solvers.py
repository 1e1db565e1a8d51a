"""Solvers of the selection knapsack on plain arrays: max sum(v) s.t. sum(t) <= T, sum(e) <= E.

Pure numpy/scipy; each returns the chosen indices. `dp` is the paper's constraint-
discretized DP (devices x latency cells x energy cells), vectorized over the grid, with
costs rounded UP onto the grid so every answer is feasible under the true costs. Before it
runs, items that cannot be in some optimal answer are dropped (k-dominance, exact), and
after it, an exact-cost local search (add / swap one item) takes back what rounding lost.
`exact` is the MILP optimum (HiGHS); `first_fit` serves the random and greedy baselines.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_GRID", "REL_TOL", "DPTable", "fits", "fits_each", "max_count", "prune_dominated", "dp", "dp_table",
           "improve", "exact", "first_fit"]

#: Cells per budget: the DP table has (DEFAULT_GRID + 1)^2 cells per device.
DEFAULT_GRID = 150
#: The grid has at least this many cells per item that can fit (many small devices).
AUTO_CELLS_PER_ITEM = 8
#: The DP's backtrack bits (items x cells) stay below this; past it the grid coarsens.
TAKEN_BYTES_MAX = 64 * 2**20
#: Relative tolerance of every feasibility check (floating-point sums of exact costs).
REL_TOL = 1e-9


def fits(t_sum: float, e_sum: float, t_max: float, e_max: float) -> bool:
    return t_sum <= t_max * (1 + REL_TOL) and e_sum <= e_max * (1 + REL_TOL)


def max_count(t: np.ndarray, e: np.ndarray, t_max: float, e_max: float) -> int:
    """An upper bound on how many items any feasible answer holds (cheapest-first counts)."""
    n_t = int(np.searchsorted(np.cumsum(np.sort(t)), t_max * (1 + REL_TOL), side="right"))
    n_e = int(np.searchsorted(np.cumsum(np.sort(e)), e_max * (1 + REL_TOL), side="right"))
    return min(n_t, n_e)


def prune_dominated(t: np.ndarray, e: np.ndarray, v: np.ndarray, t_max: float, e_max: float) -> np.ndarray:
    """Indices of the items worth keeping; an optimal answer exists among them.

    Item j is dropped when at least m other items dominate it (t <= t_j, e <= e_j,
    v >= v_j, ties broken by index), m being `max_count`: any feasible answer holding j
    has at most m - 1 other items, so one dominator is free and can replace j without
    losing value or feasibility. Items that do not fit alone are dropped too.
    """
    alone = np.flatnonzero((t <= t_max * (1 + REL_TOL)) & (e <= e_max * (1 + REL_TOL)))
    if alone.size <= 1:
        return alone
    m = max_count(t[alone], e[alone], t_max, e_max)
    if m >= alone.size:
        return alone
    tt, ee, vv = t[alone], e[alone], v[alone]
    idx = np.arange(alone.size)
    kept: list[np.ndarray] = []
    block = 512  # rows per block: bounded memory for large I
    for lo in range(0, alone.size, block):
        j = slice(lo, lo + block)
        le = (tt[None, :] <= tt[j, None]) & (ee[None, :] <= ee[j, None]) & (vv[None, :] >= vv[j, None])
        strict = (tt[None, :] < tt[j, None]) | (ee[None, :] < ee[j, None]) | (vv[None, :] > vv[j, None])
        dom = le & (strict | (idx[None, :] < idx[j, None]))
        kept.append(dom.sum(axis=1) < m)
    return alone[np.concatenate(kept)]


def dp(
    t: np.ndarray, e: np.ndarray, v: np.ndarray, t_max: float, e_max: float, grid: int | tuple[int, int] = DEFAULT_GRID
) -> np.ndarray:
    """The paper's 3-D DP on rounded-up costs, with backtracking; every answer is feasible.
    (`dp_table` builds the table, `DPTable.best` reads the answer; details there.)"""
    return dp_table(t, e, v, t_max, e_max, grid).best()


@dataclass
class DPTable:
    """The DP's final table: per cell the value, normalized cost and exact latency and energy
    sums of the answer it holds, and the "taken" bits to backtrack any cell's answer."""

    state: np.ndarray  # (4, cells_t, cells_e): value, cost, sum_t, sum_e
    taken: np.ndarray  # (items, n_t, n_e) bool
    reach: np.ndarray  # (items, 2): the table's filled extent after each item
    items: np.ndarray  # item indices in the order the table took them
    ct: np.ndarray  # rounded latency cells of every item
    ce: np.ndarray  # rounded energy cells of every item
    t_max: float
    e_max: float
    tol: float

    def best(self) -> np.ndarray:
        """The best cell whose exact sums fit T_max and E_max (ties: the cheaper answer)."""
        region = self.state
        ok = (region[2] <= self.t_max * (1 + REL_TOL)) & (region[3] <= self.e_max * (1 + REL_TOL))
        score = np.where(ok, region[0], -np.inf)
        tie = np.where(score >= score.max() - self.tol, region[1], np.inf)
        a, b = np.unravel_index(int(tie.argmin()), tie.shape)
        return self.backtrack(np.array([a]), np.array([b]))[0]

    def backtrack(self, a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
        """The answers (sorted item indices) held by the cells (a[c], b[c]), all at once."""
        a, b = np.asarray(a, np.int64).copy(), np.asarray(b, np.int64).copy()
        member = np.zeros((a.size, self.items.size), dtype=bool)
        for k in range(self.items.size - 1, -1, -1):
            a, b = np.minimum(a, self.reach[k, 0]), np.minimum(b, self.reach[k, 1])
            take = self.taken[k, a, b]
            member[:, k] = take
            i = self.items[k]
            a -= self.ct[i] * take
            b -= self.ce[i] * take
        return [np.sort(self.items[row]) for row in member]


def dp_table(
    t: np.ndarray, e: np.ndarray, v: np.ndarray, t_max: float, e_max: float, grid: int | tuple[int, int] = DEFAULT_GRID
) -> DPTable:
    """The paper's 3-D DP table on rounded-up costs.

    best[a, b] is the largest value of the items seen so far whose costs, rounded UP to
    whole cells of T_max / G_t and E_max / G_e, fit a latency cells and b energy cells;
    one vectorized max per item updates the whole table, and a bit per item and cell
    records "taken" for the backtrack. Two refinements over the textbook table: each cell
    also carries the exact latency and energy sums of the answer it holds (ties go to the
    cheaper answer), and the table reaches m cells past each budget (m = `max_count`), so
    an answer that rounding pushed over the grid's edge but that fits the true budgets
    is still found. The answer is the best cell whose exact sums fit T_max and E_max —
    inside the G_t x G_e corner that holds by construction, beyond it by the exact check.
    When many devices fit, the grid grows to AUTO_CELLS_PER_ITEM cells per device that can
    fit (rounding loses up to a cell per chosen device), and shrinks again where the
    backtrack bits would pass TAKEN_BYTES_MAX.
    """
    g_t, g_e = (grid, grid) if isinstance(grid, int) else grid
    if g_t < 1 or g_e < 1:
        raise ValueError(f"grid={grid!r}: need at least one cell per budget")
    m = max_count(t, e, t_max, e_max)
    # rounding loses up to a cell per chosen item: keep cells fine against m items
    g_t, g_e = max(g_t, AUTO_CELLS_PER_ITEM * m), max(g_e, AUTO_CELLS_PER_ITEM * m)
    m = min(m, max(g_t, g_e) // 4)  # slack cells past each budget
    n_items = int(fits_each(t, e, t_max, e_max).sum())
    shrink = (n_items * (g_t + m + 1) * (g_e + m + 1) / TAKEN_BYTES_MAX) ** 0.5
    if shrink > 1:  # keep the backtrack bits within TAKEN_BYTES_MAX: coarser cells
        g_t, g_e, m = max(1, int(g_t / shrink)), max(1, int(g_e / shrink)), int(m / shrink)
    n_t, n_e = g_t + m + 1, g_e + m + 1
    ct = np.ceil(t / (t_max / g_t)).astype(np.int64)
    ce = np.ceil(e / (e_max / g_e)).astype(np.int64)
    items = np.flatnonzero((ct < n_t) & (ce < n_e) & fits_each(t, e, t_max, e_max))
    # small items first: the reached part of the table grows slowly (see below)
    items = items[np.argsort(ct[items] / n_t + ce[items] / n_e, kind="stable")]
    inc = np.stack([v, t / t_max + e / e_max, t, e])  # value, normalized cost, exact sums
    tol = 1e-9 * max(1.0, float(v.sum()))
    state = np.zeros((4, n_t, n_e))  # per cell: the held answer's value, cost, sum_t, sum_e
    taken = np.zeros((items.size, n_t, n_e), dtype=bool)
    # Cells past (r_t, r_e) — the sums of all rounded costs so far — hold the same answer
    # as the clamped cell; they are filled only when an item first reaches them.
    r_t = r_e = 0
    reach = np.zeros((items.size, 2), dtype=np.int64)
    for k, i in enumerate(items):
        a, b = ct[i], ce[i]
        nr_t, nr_e = min(n_t - 1, r_t + a), min(n_e - 1, r_e + b)
        state[:, r_t + 1 : nr_t + 1, : r_e + 1] = state[:, r_t : r_t + 1, : r_e + 1]
        state[:, : nr_t + 1, r_e + 1 : nr_e + 1] = state[:, : nr_t + 1, r_e : r_e + 1]
        r_t, r_e = nr_t, nr_e
        reach[k] = r_t, r_e
        cand = state[:, : r_t + 1 - a, : r_e + 1 - b] + inc[:, i, None, None]
        cur = state[:, a : r_t + 1, b : r_e + 1]
        take = (cand[0] > cur[0] + tol) | ((cand[0] >= cur[0] - tol) & (cand[1] < cur[1]))
        taken[k, a : r_t + 1, b : r_e + 1] = take
        np.copyto(cur, cand, where=take[None])
    return DPTable(state[:, : r_t + 1, : r_e + 1], taken, reach, items, ct, ce, t_max, e_max, tol)


def fits_each(t: np.ndarray, e: np.ndarray, t_max: float, e_max: float) -> np.ndarray:
    """Which items fit the budgets on their own."""
    return (t <= t_max * (1 + REL_TOL)) & (e <= e_max * (1 + REL_TOL))


def improve(
    chosen: np.ndarray, t: np.ndarray, e: np.ndarray, v: np.ndarray, t_max: float, e_max: float, rounds: int = 50
) -> np.ndarray:
    """Local search on the exact costs while it pays: add one item, swap one for one, or
    swap one for two (rounding most often hides an optimum one of these moves away)."""
    sel = np.zeros(t.size, dtype=bool)
    sel[chosen] = True
    lim_t, lim_e = t_max * (1 + REL_TOL), e_max * (1 + REL_TOL)
    st, se = t[sel].sum(), e[sel].sum()
    for j in np.argsort(-v, kind="stable"):  # first fill the slack, most valuable first
        if not sel[j] and st + t[j] <= lim_t and se + e[j] <= lim_e:
            sel[j] = True
            st, se = st + t[j], se + e[j]
    for _ in range(rounds):
        st, se, out = t[sel].sum(), e[sel].sum(), np.flatnonzero(~sel)
        ins = np.flatnonzero(sel)
        if out.size == 0:
            break
        moves: list[tuple[float, list[int], list[int]]] = []
        # add: the most valuable outsider that fits the slack
        gain = np.where((st + t[out] <= lim_t) & (se + e[out] <= lim_e), v[out], -np.inf)
        j = int(gain.argmax())
        moves.append((float(gain[j]), [], [out[j]]))
        if ins.size:
            # swap one insider i for one outsider j
            nt = st - t[ins][:, None] + t[out][None, :]
            ne = se - e[ins][:, None] + e[out][None, :]
            gain = np.where((nt <= lim_t) & (ne <= lim_e), v[out][None, :] - v[ins][:, None], -np.inf)
            i, j = np.unravel_index(int(gain.argmax()), gain.shape)
            moves.append((float(gain[i, j]), [ins[i]], [out[j]]))
            if out.size >= 2 and ins.size * out.size**2 <= 4_000_000:
                # swap one insider i for two outsiders j < k
                pt = t[out][:, None] + t[out][None, :]
                pe = e[out][:, None] + e[out][None, :]
                pv = np.where(np.triu(np.ones((out.size, out.size), dtype=bool), 1), v[out][:, None] + v[out][None, :], -np.inf)
                nt = (st - t[ins])[:, None, None] + pt[None]
                ne = (se - e[ins])[:, None, None] + pe[None]
                gain = np.where((nt <= lim_t) & (ne <= lim_e), pv[None] - v[ins][:, None, None], -np.inf)
                i, j, k = np.unravel_index(int(gain.argmax()), gain.shape)
                moves.append((float(gain[i, j, k]), [ins[i]], [out[j], out[k]]))
        best_gain, drop, add = max(moves, key=lambda m: m[0])
        if best_gain <= 1e-12 * max(1.0, float(v[sel].sum())):
            break
        sel[drop] = False
        sel[add] = True
    return np.flatnonzero(sel)


def exact(
    t: np.ndarray, e: np.ndarray, v: np.ndarray, t_max: float, e_max: float, time_limit_s: float | None = None
) -> np.ndarray:
    """The optimum as a 0/1 MILP solved by HiGHS (scipy.optimize.milp), gap tolerance 0.

    With `time_limit_s`, raises TimeoutError when HiGHS has not proven optimality by then.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp  # only here: scipy costs ~0.5 s to import

    n = t.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    with _stdout_to_stderr():
        res = milp(
            c=-v,
            constraints=LinearConstraint(np.vstack([t, e]), -np.inf, [t_max, e_max]),
            integrality=np.ones(n),
            bounds=Bounds(0, 1),
            options={"mip_rel_gap": 0.0} | ({"time_limit": time_limit_s} if time_limit_s else {}),
        )
    if res.status == 1:
        raise TimeoutError(f"HiGHS did not prove optimality within {time_limit_s:g} s")
    if res.x is None:
        raise RuntimeError(f"HiGHS found no answer: {res.message}")
    chosen = np.flatnonzero(res.x > 0.5)
    # HiGHS accepts a violation up to its feasibility tolerance (1e-6): repair on exact sums
    while chosen.size and not fits(t[chosen].sum(), e[chosen].sum(), t_max, e_max):
        chosen = np.delete(chosen, int(np.argmin(v[chosen])))
    return chosen


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """HiGHS 1.x prints debug lines to file descriptor 1; keep `--json` stdout clean."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # captured stdout (pytest): nothing to guard
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        os.dup2(2, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def first_fit(order: np.ndarray, t: np.ndarray, e: np.ndarray, t_max: float, e_max: float) -> np.ndarray:
    """Walk the items in `order`, taking each one that still fits the remaining budgets."""
    chosen, st, se = [], 0.0, 0.0
    for i in order:
        if fits(st + t[i], se + e[i], t_max, e_max):
            chosen.append(int(i))
            st += t[i]
            se += e[i]
    return np.array(chosen, dtype=np.int64)
