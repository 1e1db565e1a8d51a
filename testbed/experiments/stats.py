"""Statistics over seeds for the paper's claims, and the rule that turns them into a verdict.

Pure. The seed is the unit: a seed is one placement, one precision draw and one noise, and
the runs of one seed (its budget points, its pairs of T_max values) are not independent.
So each claim reduces every seed to one number, its effect (the mean of what the claim
compares within that seed, or the seed's least-squares slope), and every statistic is
over those numbers:

- an exact sign test over the seeds' effects (one-sided, binomial, ties dropped);
- a Student t interval (95 %) of the mean effect over seeds: it covers at small n, where
  a percentile bootstrap of five numbers (at most 126 distinct resamples, no wider than
  the data) under-covers;
- Holm's step-down correction across the tests of one sweep (each part of a claim is one
  test): `p_adjusted`, and the same for the opposite side (`p_against_adjusted`).

`verdict()` is the only rule: `holds` when at least MIN_SEEDS seeds, p_adjusted < ALPHA
and the interval lies wholly on the claimed side of zero (and every condition holds);
`does not hold` when a condition fails, the adjusted sign test favours the other side or
the interval reaches no further than zero on the claimed side; otherwise `inconclusive` —
always with fewer than MIN_SEEDS seeds. `reason()` says why, in words. No tolerance
anywhere: zero is the line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import binomtest
from scipy.stats import t as student_t

__all__ = [
    "ALPHA", "LEVEL", "MIN_SEEDS", "UNIT", "VERDICTS", "Evidence", "combine", "finalize", "holm", "ols_slope",
    "reason", "sign_test", "t_interval", "verdict",
]

ALPHA = 0.05
LEVEL = 0.95
MIN_SEEDS = 5
UNIT = "seed"
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
    return {"name": "exact sign test over seeds", "alternative": alternative, "n": n, "for": k_for,
            "against": k_against, "ties": len(values) - n, "p_value": float(p_for), "p_against": float(p_against),
            "alpha": ALPHA}


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float] | None:
    """Student t interval of the mean of `values` (None with fewer than two)."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    half = float(student_t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return float(x.mean() - half), float(x.mean() + half)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the given order."""
    p = np.asarray(p_values, dtype=float)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return [float(a) for a in adjusted]


def ols_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ys on xs (None with fewer than two distinct xs)."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(set(xs)) < 2:
        return None
    dx = x - x.mean()
    return float(dx @ (y - y.mean()) / (dx @ dx))


@dataclass
class Evidence:
    """The statistics of one claim (or one part of it): per seed, what the effect averages."""

    statement: str
    alternative: str  # 'greater': the claim says the effect is > 0; 'less': < 0
    effect_what: str
    units: str  # what one seed's effect is the mean of
    by_seed: dict[int, list[float]]  # seed -> the values its effect averages
    conditions: list[dict[str, Any]] = field(default_factory=list)  # {"what", "holds", "failed_at"}
    note: str = ""

    @property
    def seed_effects(self) -> dict[int, float]:
        return {s: float(np.mean(v)) for s, v in sorted(self.by_seed.items()) if len(v)}

    @property
    def n_seeds(self) -> int:
        return len(self.seed_effects)

    def to_json(self) -> dict[str, Any]:
        """The claim's statistics; `finalize` adds p_adjusted and the verdict."""
        effects = list(self.seed_effects.values())
        interval = t_interval(effects)
        test = sign_test(effects, self.alternative)
        test["units"] = f"seeds (each seed's effect: {self.units})"
        doc = {
            "statement": self.statement,
            "unit": UNIT,
            "n_seeds": self.n_seeds,
            "effect": _round(float(np.mean(effects))) if effects else None,
            "effect_what": self.effect_what,
            "interval": None if interval is None else {
                "low": _round(interval[0]), "high": _round(interval[1]), "level": LEVEL,
                "method": "Student t over the seeds' effects"},
            "test": test,
            "conditions": self.conditions,
        }
        if self.note:
            doc["note"] = self.note
        return doc


def _round(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def _tests(claims: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sweep's tests: each part of a claim, or the claim itself."""
    return [p for c in claims for p in (c["parts"] if "parts" in c else [c])]


def finalize(claims: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Holm across the sweep's tests, then every verdict (in place; returns `claims`)."""
    tests = _tests(claims)
    for key, out in (("p_value", None), ("p_against", "p_against_adjusted")):
        for doc, adj in zip(tests, holm([d["test"][key] for d in tests])):
            if out is None:
                doc["p_adjusted"] = _round(adj)
            else:
                doc["test"][out] = _round(adj)
    for c in claims:
        for part in c.get("parts", []):
            part["verdict"] = verdict(part)
        if "parts" in c:
            c["p_adjusted"] = max(p["p_adjusted"] for p in c["parts"])  # every part must hold
        c["verdict"] = verdict(c)
    return claims


def _p(doc: Mapping[str, Any]) -> tuple[float, float]:
    test = doc["test"]
    return (doc.get("p_adjusted", test["p_value"]), test.get("p_against_adjusted", test["p_against"]))


def verdict(doc: Mapping[str, Any]) -> str:
    """The verdict that a claim's statistics (as written to claims.json) imply; see the module doc."""
    if "parts" in doc:
        return combine([verdict(p) for p in doc["parts"]])
    if doc["n_seeds"] < MIN_SEEDS or doc.get("interval") is None:
        return "inconclusive"
    test, ci = doc["test"], doc["interval"]
    p_for, p_against = _p(doc)
    sign = 1 if test["alternative"] == "greater" else -1
    near, far = sorted((sign * ci["low"], sign * ci["high"]))  # the interval, claimed side positive
    if any(not c["holds"] for c in doc.get("conditions", [])) or p_against < ALPHA or far <= 0:
        return "does not hold"
    if p_for < ALPHA and near > 0:
        return "holds"
    return "inconclusive"


def reason(doc: Mapping[str, Any], n_tests: int | None = None) -> str:
    """Why the verdict is what it is, in a sentence (`n_tests`: how many tests Holm covered)."""
    if "parts" in doc:
        return "; ".join(f"part {'abcdefgh'[i]}: {verdict(p)}: {reason(p, n_tests)}"
                         for i, p in enumerate(doc["parts"]))
    n, test, ci = doc["n_seeds"], doc["test"], doc.get("interval")
    p_for, p_against = _p(doc)
    tally = f"{test['for']} of {test['n']} seeds for, {test['against']} against"
    if n < MIN_SEEDS:
        floor = 0.5 ** n
        return (f"{n} seed{'s' * (n != 1)}: a verdict needs at least {MIN_SEEDS} (the seed is the unit; with {n} "
                f"the sign test's smallest p is {floor:.3g})" + (f"; {tally}" if n else ""))
    if ci is None:
        return doc.get("note") or "no interval"
    span = f"[{ci['low']:+.3g}, {ci['high']:+.3g}]"
    failed = [f"{c['what']} fails at {'; '.join(c['failed_at'])}" for c in doc.get("conditions", []) if not c["holds"]]
    why = verdict(doc)
    sign = 1 if test["alternative"] == "greater" else -1
    near, far = sorted((sign * ci["low"], sign * ci["high"]))
    if why == "does not hold":
        parts = failed[:]
        if p_against < ALPHA:
            parts.append(f"{tally}: the other side, p = {p_against:.2g} after Holm")
        if far <= 0:
            parts.append(f"the 95 % interval {span} does not reach past 0 on the claimed side")
        return "; ".join(parts)
    if why == "holds":
        return f"{tally}, p = {p_for:.2g} after Holm < {ALPHA:g}; 95 % interval {span} excludes 0"
    parts = []
    if p_for >= ALPHA:
        parts.append(f"{tally}: p = {p_for:.2g} after Holm, not below {ALPHA:g}")
        if n_tests and test["for"] == test["n"] and 0.5 ** test["n"] * n_tests >= ALPHA:
            parts.append(f"all agree, but {test['n']} seeds cannot reach it across {n_tests} tests: run more seeds")
    if near <= 0:
        parts.append(f"the 95 % interval {span} includes 0")
    return "; ".join(parts)


def combine(verdicts: Sequence[str]) -> str:
    """A claim made of parts holds when every part holds and fails when any part fails."""
    if any(v == "does not hold" for v in verdicts):
        return "does not hold"
    return "holds" if verdicts and all(v == "holds" for v in verdicts) else "inconclusive"
