"""A sweep's confidence axis: plans made with `--confidence P`, and how often runs kept T_max.

`testbed sweep FILE --confidence none,0.8,0.9` runs every method that takes a confidence
(its registry line says so) once per value — `none` is the mean-based plan — and every
other method once, mean-based. Each (method, selector, P) is a compared run of its own
(`multistage:dp@0.9`, sweep.RunSpec): the paper's claims and Fig. 4 keep to the
mean-based rows.

`within_by_confidence(rows)` is the answer to "does the plan keep its promise": per compared
run and P, the share of its runs whose measured latency kept T_max (with a 95 % Wilson
interval), beside the plan's own modelled probability (mean `p_within`) and the P asked
for. `write_confidence_csv` writes it as confidence.csv; plots.confidence_figure draws it.
A run that was infeasible at its point counts in `infeasible`, not in the share.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testbed.errors import InputError
from testbed.methods import method

__all__ = ["CSV_NAME", "SUMMARY_COLUMNS", "expand", "parse_confidences", "within_by_confidence",
           "write_confidence_csv"]

CSV_NAME = "confidence.csv"
#: confidence.csv, in order: (column, what it is)
SUMMARY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run", "the compared run without its P (method:selector, or the method)"),
    ("confidence", "the P asked for (empty: the mean-based plan)"),
    ("runs", "runs that produced an image (record)"),
    ("infeasible", "points where no plan kept the constraints (record)"),
    ("within_t_max", "runs whose measured latency kept T_max (measured)"),
    ("share_within", "within_t_max / runs (measured)"),
    ("share_low", "95 % Wilson interval of the share, low end"),
    ("share_high", "its high end"),
    ("p_within_mean", "the plans' modelled P(latency <= T_max), mean over the runs (modelled)"),
)


def parse_confidences(text: str, option: str = "--confidence") -> list[float | None]:
    """`none,0.8,0.9` -> [None, 0.8, 0.9]: each P strictly between 0 and 1; `none` (or
    `mean`): the mean-based plan; no duplicates; InputError (exit 2) otherwise."""
    out: list[float | None] = []
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        if part in ("none", "mean"):
            value: float | None = None
        else:
            try:
                value = float(part)
            except ValueError:
                raise InputError(f"{option} {text!r}: {part!r} is neither a probability nor 'none'; "
                                 f"write e.g. {option} none,0.9") from None
            if not (math.isfinite(value) and 0 < value < 1):
                raise InputError(f"{option} {text!r}: {part} must be strictly between 0 and 1 (e.g. 0.9)")
        if value not in out:
            out.append(value)
    if not out:
        raise InputError(f"{option} is empty; write e.g. {option} none,0.9")
    return out


def expand(specs: Sequence[Any], levels: Sequence[float | None]) -> list[Any]:
    """Every compared run once per level where its method takes a confidence, once (mean-based) otherwise."""
    from dataclasses import replace

    out: list[Any] = []
    for spec in specs:
        takes = method(spec.method).takes_confidence
        for level in (levels if takes else [None]):
            one = replace(spec, confidence=level)
            if one not in out:
                out.append(one)
    return out


def within_by_confidence(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (compared run, P): runs, infeasible points, runs within T_max and the share, its
    Wilson interval, and the mean modelled probability; mean-based first, then by P."""
    from testbed.experiments.sweep import RunSpec, planned_confidence
    from testbed.selection.checks import wilson

    groups: dict[tuple[str, float | None], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        base = RunSpec(r["method"], r.get("selector") or r["strategy"]).key
        groups[(base, planned_confidence(r))].append(r)
    out = []
    for (base, level), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -1.0 if kv[0][1] is None else kv[0][1])):
        ran = [r for r in rs if r.get("feasible")]
        k = sum(1 for r in ran if float(r["latency_s"]) <= float(r["t_max_s"]))
        lo, hi = wilson(k, len(ran)) if ran else (math.nan, math.nan)
        p = [float(r["p_within"]) for r in ran if isinstance(r.get("p_within"), (int, float))]
        out.append({"run": base, "confidence": level, "runs": len(ran), "infeasible": len(rs) - len(ran),
                    "within_t_max": k, "share_within": k / len(ran) if ran else math.nan, "share_low": lo,
                    "share_high": hi, "p_within_mean": sum(p) / len(p) if p else math.nan})
    return out


def write_confidence_csv(rows: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """confidence.csv (columns: SUMMARY_COLUMNS); its rows."""
    summary = within_by_confidence(rows)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[c for c, _ in SUMMARY_COLUMNS])
        w.writeheader()
        for s in summary:
            w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else
                            f"{v:.4g}" if isinstance(v, float) else v) for k, v in s.items()})
    return summary
