"""Paired statistics over seeds for the paper's claims, and the rule that turns them into a verdict.

Pure. A claim compares paired *units* (e.g. two methods at the same budgets and seed) and
says on which side of zero their differences lie. Two statistics judge it:

- a sign test over the units (exact binomial, one-sided, ties dropped): are more units
  on the claimed side than chance would put there?
- a percentile bootstrap interval of the effect, resampling whole seeds (a seed is one
  placement, precision draw and noise: the units of one seed are not independent).

`verdict()` is the only rule: `holds` when the sign test's p < ALPHA and the interval
lies wholly on the claimed side of zero (and every necessary condition holds);
`does not hold` when a necessary condition fails, the sign test favours the other side
(p < ALPHA) or the interval reaches no further than zero on the claimed side; otherwise
`inconclusive` — always so with fewer than MIN_SEEDS seeds, whose bootstrap has too few
distinct resamples to bound anything. No tolerance anywhere: zero is the line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import binomtest

__all__ = [
    "ALPHA", "LEVEL", "MIN_SEEDS", "RESAMPLES", "VERDICTS", "Evidence", "ols_slope", "pair_signs",
    "seed_bootstrap", "sign_test", "verdict", "combine",
]

ALPHA = 0.05
LEVEL = 0.95
MIN_SEEDS = 3
RESAMPLES = 10_000
VERDICTS = ("holds", "does not hold", "inconclusive")


def sign_test(values: Sequence[float], alternative: str) -> dict[str, Any]:
    """Exact one-sided sign test of `values` against zero; `alternative` 'greater' or 'less'."""
    if alternative not in ("greater", "less"):
        raise ValueError(f"alternative {alternative!r}: 'greater' or 'less'")
    pos = sum(1 for v in values if v > 0)
    neg = sum(1 for v in values if v < 0)
    n = pos + neg
    k_for, k_against = (pos, neg) if alternative == "greater" else (neg, pos)
    p_for = binomtest(k_for, n, 0.5, alternative="greater").pvalue if n else 1.0
    p_against = binomtest(k_against, n, 0.5, alternative="greater").pvalue if n else 1.0
    return {"name": "sign test", "alternative": alternative, "n": n, "for": k_for, "against": k_against,
            "ties": len(values) - n, "p_value": float(p_for), "p_against": float(p_against), "alpha": ALPHA}


def seed_bootstrap(by_seed: Mapping[int, Sequence[float]], *, resamples: int = RESAMPLES,
                   rng_seed: int = 0) -> tuple[float, float] | None:
    """Percentile interval (LEVEL) of the mean unit value, resampling seeds with replacement.

    None with fewer than two seeds that have units (nothing to resample)."""
    groups = [list(v) for v in by_seed.values() if len(v)]
    if len(groups) < 2:
        return None
    sums = np.array([sum(g) for g in groups], dtype=float)
    counts = np.array([len(g) for g in groups], dtype=float)
    idx = np.random.default_rng(rng_seed).integers(0, len(groups), size=(resamples, len(groups)))
    means = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def ols_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ys on xs (None with fewer than two distinct xs)."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(set(xs)) < 2:
        return None
    dx = x - x.mean()
    return float(dx @ (y - y.mean()) / (dx @ dx))


def pair_signs(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    """y_j - y_i for every pair x_i < x_j: the Kendall-style units of a trend over every x."""
    pts = sorted(zip(xs, ys))
    return [pts[j][1] - pts[i][1] for i in range(len(pts)) for j in range(i + 1, len(pts)) if pts[i][0] < pts[j][0]]


@dataclass
class Evidence:
    """The statistics of one claim (or one part of it)."""

    statement: str
    alternative: str  # 'greater': the claim says the effect is > 0; 'less': < 0
    effect: float | None
    effect_what: str
    units: str
    unit_values: dict[int, list[float]]  # seed -> the sign test's units
    effect_by_seed: dict[int, list[float]]  # seed -> what the effect averages (bootstrap input)
    conditions: list[dict[str, Any]] = field(default_factory=list)  # {"what", "holds", "failed_at"}
    note: str = ""

    @property
    def n_seeds(self) -> int:
        return sum(1 for v in self.effect_by_seed.values() if v)

    def to_json(self) -> dict[str, Any]:
        interval = seed_bootstrap(self.effect_by_seed)
        test = sign_test([v for vs in self.unit_values.values() for v in vs], self.alternative)
        test["units"] = self.units
        doc = {
            "statement": self.statement,
            "n_seeds": self.n_seeds,
            "effect": _round(self.effect),
            "effect_what": self.effect_what,
            "interval": None if interval is None else {
                "low": _round(interval[0]), "high": _round(interval[1]), "level": LEVEL,
                "method": f"percentile bootstrap over seeds ({RESAMPLES} resamples, rng seed 0)"},
            "test": test,
            "conditions": self.conditions,
        }
        if self.note:
            doc["note"] = self.note
        doc["verdict"] = verdict(doc)
        return doc


def _round(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def verdict(doc: Mapping[str, Any]) -> str:
    """The verdict that a claim's statistics (as written to claims.json) imply; see the module doc."""
    if "parts" in doc:
        return combine([verdict(p) for p in doc["parts"]])
    if doc["n_seeds"] < MIN_SEEDS or doc.get("interval") is None:
        return "inconclusive"
    test, ci = doc["test"], doc["interval"]
    sign = 1 if test["alternative"] == "greater" else -1
    near, far = sorted((sign * ci["low"], sign * ci["high"]))  # the interval, claimed side positive
    if any(not c["holds"] for c in doc.get("conditions", [])) or test["p_against"] < ALPHA or far <= 0:
        return "does not hold"
    if test["p_value"] < ALPHA and near > 0:
        return "holds"
    return "inconclusive"


def combine(verdicts: Sequence[str]) -> str:
    """A claim made of parts holds when every part holds and fails when any part fails."""
    if any(v == "does not hold" for v in verdicts):
        return "does not hold"
    return "holds" if verdicts and all(v == "holds" for v in verdicts) else "inconclusive"
