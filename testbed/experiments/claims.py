"""The paper's three claims (section IV-B), judged from a sweep's measured rows.

Pure. Each claim compares means over seeds of measured numbers at equal budgets:

1. multi-stage (w/ DS) beats split: higher MS-SSIM at every (T_max, E_max) point where
   at least one of them produced an image;
2. with device selection beats without: w/ DS not below w/o DS by more than TIE (0.01
   MS-SSIM: two selections with the same step count differ only by their precisions) at
   any point, and higher on average over the points;
3. multi-stage's transmission share falls as T_max grows (at the reference E_max: the
   share at the smallest T_max is above the share at the largest), while split's share
   stays above one half at every T_max.

A run with no image within the budgets counts as MS-SSIM 0 (experiments_plots).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from testbed.experiments.plots import _quality, reference_budget

__all__ = ["ClaimResult", "evaluate_claims", "claims_markdown", "tran_share_by_tmax"]

DS, NO_DS, SPLIT = "multistage:dp", "multistage:random", "split"
TIE = 0.01


@dataclass(frozen=True)
class ClaimResult:
    number: int
    claim: str
    holds: bool | None  # None: the sweep lacks the runs to judge it
    measured: str


def _key(r: dict[str, Any]) -> str:
    return "split" if r["method"] == "split" else f"{r['method']}:{r['strategy']}"


def _mean_quality(rows: list[dict[str, Any]]) -> dict[tuple[str, float, float], float]:
    g: dict[tuple[str, float, float], list[float]] = defaultdict(list)
    for r in rows:
        g[(_key(r), float(r["t_max_s"]), float(r["e_max_j"]))].append(_quality(r))
    return {k: float(np.mean(v)) for k, v in g.items()}


def tran_share_by_tmax(rows: list[dict[str, Any]], key: str, e_max_j: float) -> dict[float, float]:
    """Measured t_tran / (t_tran + t_cmp), summed over seeds, per T_max (feasible runs)."""
    acc: dict[float, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        if _key(r) == key and float(r["e_max_j"]) == e_max_j and r.get("feasible"):
            acc[float(r["t_max_s"])][0] += float(r["t_tran_s"] or 0)
            acc[float(r["t_max_s"])][1] += float(r["t_cmp_s"] or 0)
    return {t: a / (a + c) for t, (a, c) in sorted(acc.items()) if a + c > 0}


def _compare(q: dict, a: str, b: str) -> tuple[list[tuple[float, float, float, float]], int]:
    pts = sorted({(t, e) for (k, t, e) in q if k == a} & {(t, e) for (k, t, e) in q if k == b})
    return [(t, e, q[(a, t, e)], q[(b, t, e)]) for t, e in pts], len(pts)


def evaluate_claims(rows: list[dict[str, Any]]) -> list[ClaimResult]:
    q = _mean_quality(rows)
    out: list[ClaimResult] = []

    pts, n = _compare(q, DS, SPLIT)
    text1 = "multi-stage (w/ DS) beats split at equal T_max and E_max"
    if n:
        judged = [(t, e, a, b) for t, e, a, b in pts if a > 0 or b > 0]
        wins = sum(1 for _, _, a, b in judged if a > b)
        margin = float(np.mean([a - b for _, _, a, b in judged])) if judged else 0.0
        out.append(ClaimResult(1, text1, bool(judged) and wins == len(judged),
                               f"higher MS-SSIM at {wins} of {len(judged)} points; mean margin {margin:+.3f}"))
    else:
        out.append(ClaimResult(1, text1, None, "sweep lacks multistage:dp or split runs"))

    pts, n = _compare(q, DS, NO_DS)
    text2 = "with device selection (w/ DS) beats without (w/o DS)"
    if n:
        ge = sum(1 for _, _, a, b in pts if a >= b - TIE)
        gt = sum(1 for _, _, a, b in pts if a > b + TIE)
        ma, mb = float(np.mean([a for *_, a, _ in pts])), float(np.mean([b for *_, b in pts]))
        out.append(ClaimResult(2, text2, ge == n and ma > mb,
                               f"w/ DS >= w/o DS - {TIE:g} at {ge} of {n} points (higher at {gt}); mean MS-SSIM "
                               f"{ma:.3f} vs {mb:.3f}"))
    else:
        out.append(ClaimResult(2, text2, None, "sweep lacks multistage:dp or multistage:random runs"))

    text3 = "multi-stage's transmission share falls as T_max grows; split stays dominated by transmission"
    e_vals = sorted({float(r["e_max_j"]) for r in rows})
    if e_vals:
        e_ref = reference_budget(e_vals, 200.0)
        ms, sp = tran_share_by_tmax(rows, DS, e_ref), tran_share_by_tmax(rows, SPLIT, e_ref)
        if len(ms) >= 2 and sp:
            ts = sorted(ms)
            falls = ms[ts[0]] > ms[ts[-1]]
            dominated = min(sp.values()) > 0.5
            fmt = lambda d: ", ".join(f"{t:g} s: {100 * v:.0f}%" for t, v in d.items())  # noqa: E731
            out.append(ClaimResult(3, text3, falls and dominated,
                                   f"transmission share at E_max {e_ref:g} J — multi-stage {fmt(ms)}; split {fmt(sp)}"))
        else:
            out.append(ClaimResult(3, text3, None, "needs multistage:dp at >= 2 T_max values and split runs"))
    return out


def claims_markdown(results: list[ClaimResult]) -> str:
    lines = ["| # | paper's claim | holds here? | measured |", "| --- | --- | --- | --- |"]
    for c in results:
        verdict = "n/a" if c.holds is None else ("yes" if c.holds else "**no**")
        lines.append(f"| {c.number} | {c.claim} | {verdict} | {c.measured} |")
    return "\n".join(lines)
