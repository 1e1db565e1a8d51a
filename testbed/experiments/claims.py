"""The paper's claims (section IV-B) as statistics over a sweep's rows; `claims.json`.

Pure, apart from `write_claims`. Four claims with fixed ids, each judged over seeds — the
seed is the unit (testbed/experiments/stats.py: each seed's effect, an exact sign test
over seeds, a t interval, Holm across the sweep's tests, one verdict rule):

1. multi-stage (w/ DS) beats split: a seed's effect is its mean MS-SSIM difference
   w/ DS - split over the (T_max, E_max) points where either produced an image.
2. with device selection beats without: the same, w/ DS - w/o DS; it also needs w/ DS's
   mean >= w/o DS's mean at every (T_max, E_max) point.
3. multi-stage's transmission share falls with T_max while split's stays high, at the
   reference E_max (the paper's 200 J, else the loosest swept): (a) a seed's effect is
   the least-squares slope of w/ DS's share over every T_max; (b) a seed's effect is its
   split runs' mean share - 1/2, and split's mean must be above 1/2 at every T_max. Both
   parts must hold.
4. quality rises with T_max: w/ DS's MS-SSIM at the reference E_max, a slope like 3a.

A run with no image within its budgets counts as MS-SSIM 0. The transmission share is
measured t_tran / (t_tran + t_cmp), where t_cmp is emulated in `compute: profile`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from testbed.experiments.plots import quality, reference_budget
from testbed.methods import PAPER_RUNS
from testbed.experiments.stats import ALPHA, LEVEL, MIN_SEEDS, Evidence, finalize, ols_slope, reason

__all__ = ["CLAIMS", "evaluate_claims", "claims_doc", "claims_markdown", "claims_table", "claims_text",
           "write_claims", "tran_share"]

# the paper's compared runs, by their role (the method registry names them)
DS, NO_DS, SPLIT = PAPER_RUNS["ds"], PAPER_RUNS["no_ds"], PAPER_RUNS["baseline"]
_SHORT = {"ds": "w/ DS", "no_ds": "w/o DS", "baseline": "split"}  # how the claims' text calls each role
CLAIMS = {
    1: "multi-stage (w/ DS) beats split diffusion at equal T_max and E_max",
    2: "with device selection (w/ DS) beats without (w/o DS)",
    3: "multi-stage's transmission share falls as T_max grows, while split's stays high",
    4: "quality rises with T_max",
}

Row = dict[str, Any]


def _key(r: Row) -> str:
    from testbed.experiments.sweep import row_key

    return row_key(r)


def tran_share(r: Row) -> float | None:
    """t_tran / (t_tran + t_cmp) of a run with an image (None otherwise)."""
    if not r.get("feasible"):
        return None
    tt, tc = float(r.get("t_tran_s") or 0), float(r.get("t_cmp_s") or 0)
    return tt / (tt + tc) if tt + tc > 0 else None


def _by_point(rows: list[Row], key: str) -> dict[tuple[float, float, int], Row]:
    return {(float(r["t_max_s"]), float(r["e_max_j"]), int(r["seed"])): r for r in rows if _key(r) == key}


def _paired(rows: list[Row], a: str, b: str, statement: str) -> Evidence:
    """A seed's effect: the mean over its budget points of MS-SSIM of `a` minus `b`, where either has an image."""
    ra, rb = _by_point(rows, a), _by_point(rows, b)
    units: dict[int, list[float]] = defaultdict(list)
    for pt in sorted(ra.keys() & rb.keys()):
        if ra[pt].get("feasible") or rb[pt].get("feasible"):
            units[pt[2]].append(quality(ra[pt]) - quality(rb[pt]))
    values = [v for vs in units.values() for v in vs]
    return Evidence(
        statement=statement, alternative="greater",
        effect_what=f"mean over seeds of each seed's mean MS-SSIM difference, {_label(a)} - {_label(b)}",
        units="its mean MS-SSIM difference over the (T_max, E_max) points where either method produced an image",
        by_seed=dict(units), note="" if values else f"the sweep has no paired {a} and {b} runs")


def _label(key: str) -> str:
    return next((_SHORT[role] for role, k in PAPER_RUNS.items() if k == key), key)


def _point_means(rows: list[Row], key: str, value: Callable[[Row], float | None],
                 group: Callable[[Row], Any]) -> dict[Any, float]:
    acc: dict[Any, list[float]] = defaultdict(list)
    for r in rows:
        v = value(r) if _key(r) == key else None
        if v is not None:
            acc[group(r)].append(v)
    return {g: float(np.mean(vs)) for g, vs in sorted(acc.items())}


def _trend(rows: list[Row], key: str, value: Callable[[Row], float | None], e_ref: float, alternative: str,
           statement: str, what: str) -> Evidence:
    """A trend over every T_max at E_max = e_ref: a seed's effect is its least-squares slope."""
    series: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        v = value(r) if _key(r) == key and float(r["e_max_j"]) == e_ref else None
        if v is not None:
            series[int(r["seed"])].append((float(r["t_max_s"]), v))
    slopes = {}
    for seed, pts in sorted(series.items()):
        slope = ols_slope([p[0] for p in pts], [p[1] for p in pts])
        if slope is not None:
            slopes[seed] = [slope]
    return Evidence(
        statement=statement, alternative=alternative,
        effect_what=f"mean over seeds of each seed's least-squares slope of {what} over T_max (per second), "
                    f"E_max {e_ref:g} J",
        units=f"the least-squares slope of its {what} over every T_max, E_max {e_ref:g} J", by_seed=slopes,
        note="" if slopes else f"needs {key} runs at >= 2 T_max values with E_max {e_ref:g} J")


def _e_ref(rows: list[Row]) -> float:
    return reference_budget(sorted({float(r["e_max_j"]) for r in rows}), 200.0)


def evaluate_claims(rows: list[Row]) -> list[dict[str, Any]]:
    """The four claims as JSON-ready dicts (id, statement, verdict, unit, n_seeds, p_adjusted, effect,
    interval, test, ...), Holm-corrected across the sweep's tests."""
    out: list[dict[str, Any]] = []
    ev1 = _paired(rows, DS, SPLIT, CLAIMS[1])
    out.append({"id": 1, **ev1.to_json()})

    ev2 = _paired(rows, DS, NO_DS, CLAIMS[2])
    point = lambda r: (float(r["t_max_s"]), float(r["e_max_j"]))  # noqa: E731
    m_ds, m_rnd = _point_means(rows, DS, quality, point), _point_means(rows, NO_DS, quality, point)
    below = [f"T_max {t:g} s, E_max {e:g} J: {m_ds[(t, e)]:.3f} < {m_rnd[(t, e)]:.3f}"
             for (t, e) in sorted(m_ds.keys() & m_rnd.keys()) if m_ds[(t, e)] < m_rnd[(t, e)]]
    ev2.conditions.append({"what": "w/ DS's mean MS-SSIM >= w/o DS's at every (T_max, E_max) point",
                           "holds": not below, "failed_at": below})
    out.append({"id": 2, **ev2.to_json()})

    e_ref = _e_ref(rows) if rows else 200.0
    at_ref = [r for r in rows if float(r["e_max_j"]) == e_ref]
    ev3a = _trend(rows, DS, tran_share, e_ref, "less",
                  "multi-stage (w/ DS)'s transmission share falls as T_max grows", "share")
    split_units: dict[int, list[float]] = defaultdict(list)
    for r in at_ref:
        s = tran_share(r) if _key(r) == SPLIT else None
        if s is not None:
            split_units[int(r["seed"])].append(s - 0.5)
    flat = [v for vs in split_units.values() for v in vs]
    ev3b = Evidence(
        statement="split's transmission share stays above one half at every T_max", alternative="greater",
        effect_what=f"mean over seeds of each seed's mean transmission share of split runs minus 1/2, "
                    f"E_max {e_ref:g} J",
        units=f"the mean share - 1/2 of its split runs with an image at E_max {e_ref:g} J",
        by_seed=dict(split_units), note="" if flat else "the sweep has no split run with an image")
    low = [f"T_max {t:g} s: {m:.2f}" for t, m in
           _point_means(at_ref, SPLIT, tran_share, lambda r: float(r["t_max_s"])).items() if m <= 0.5]
    ev3b.conditions.append({"what": "split's mean share > 1/2 at every T_max", "holds": not low, "failed_at": low})
    parts = [ev3a.to_json(), ev3b.to_json()]
    claim3 = {"id": 3, **{k: v for k, v in parts[0].items() if k != "statement"}, "statement": CLAIMS[3],
              "parts": parts}
    claim3["n_seeds"] = min(p["n_seeds"] for p in parts)
    out.append(claim3)

    ev4 = _trend(rows, DS, quality, e_ref, "greater", CLAIMS[4] + f" (multi-stage w/ DS, E_max {e_ref:g} J)",
                 "MS-SSIM")
    out.append({"id": 4, **ev4.to_json()})
    return [_ordered(c) for c in finalize(out)]


def _ordered(c: dict[str, Any]) -> dict[str, Any]:
    head = ("id", "statement", "verdict", "unit", "n_seeds", "p_adjusted", "effect", "effect_what", "interval", "test")
    return {**{k: c[k] for k in head if k in c}, **{k: v for k, v in c.items() if k not in head}}


def claims_doc(rows: list[Row], source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The claims.json document: the claims plus the rule and where the rows came from."""
    return {
        "claims": evaluate_claims(rows),
        "rule": (f"the seed is the unit: each seed's effect, an exact sign test over seeds with Holm's correction "
                 f"across the sweep's tests (p_adjusted), a {LEVEL:.0%} Student t interval over the seeds' effects; "
                 f"holds: at least {MIN_SEEDS} seeds, p_adjusted < {ALPHA} and the interval wholly on the claimed "
                 "side of 0 (and every condition holds); does not hold: a condition fails, the adjusted sign test "
                 f"favours the other side (p < {ALPHA}) or the interval does not reach past 0 on the claimed side; "
                 f"inconclusive otherwise, and always with fewer than {MIN_SEEDS} seeds"),
        "source": source or {},
    }


def write_claims(rows: list[Row], path: Path, source: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = claims_doc(rows, source)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3g}"


def _interval(part: dict[str, Any]) -> str:
    ci = part.get("interval")
    return f"[{_num(ci['low'])}, {_num(ci['high'])}]" if ci else "none (< 2 seeds)"


def _p_adj(part: dict[str, Any]) -> str:
    p = part.get("p_adjusted")
    return "n/a" if p is None else f"{p:.2g}"


def _lines(claims: list[dict[str, Any]]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(label, statement, verdict, statistics) of every claim and part, in order."""
    out = []
    for c in claims:
        out.append((str(c["id"]), c["statement"], c["verdict"], c))
        for i, part in enumerate(c.get("parts", [])):
            out.append((f"{c['id']}{'abcdefgh'[i]}", part["statement"], part["verdict"], part))
    return out


def _n_tests(claims: list[dict[str, Any]]) -> int:
    return sum(len(c.get("parts", [])) or 1 for c in claims)


def claims_markdown(claims: list[dict[str, Any]]) -> str:
    """The claims table (docs/reproducing.md quotes it verbatim)."""
    lines = ["| # | claim | verdict | seeds | effect [95 % t interval] | seeds for / against / tied | p (Holm) | why "
             "| effect is |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    n_tests = _n_tests(claims)
    for label, statement, verdict_, part in _lines(claims):
        if "parts" in part:
            lines.append(f"| {label} | {statement} | **{verdict_}** | {part['n_seeds']} | | | {_p_adj(part)} | "
                         f"both parts must hold | |")
            continue
        t = part["test"]
        bold = verdict_ if label[-1].isalpha() else f"**{verdict_}**"  # parts plain, claims bold
        lines.append(f"| {label} | {statement} | {bold} | {part['n_seeds']} | {_num(part['effect'])} "
                     f"{_interval(part)} | {t['for']} / {t['against']} / {t['ties']} | {_p_adj(part)} | "
                     f"{reason(part, n_tests)} | {part['effect_what']} |")
    return "\n".join(lines)


def claims_table(claims: list[dict[str, Any]]) -> Any:
    """The claims for the terminal: a rich Table, every verdict with its reason (`testbed sweep` prints it)."""
    from rich.table import Table

    table = Table(title="The paper's claims (the seed is the unit; exact sign test over seeds, Holm across "
                        f"the sweep's {_n_tests(claims)} tests, 95 % t interval)", show_lines=True, expand=True)
    for name, kw in (("#", {"no_wrap": True}), ("claim", {"ratio": 3}), ("verdict", {"no_wrap": True}),
                     ("seeds", {"justify": "right"}), ("effect [95 % t]", {"no_wrap": True}),
                     ("p (Holm)", {"justify": "right"}), ("why", {"ratio": 4})):
        table.add_column(name, **kw)
    n_tests = _n_tests(claims)
    style = {"holds": "green", "does not hold": "red", "inconclusive": "yellow"}
    for label, statement, verdict_, part in _lines(claims):
        effect = "" if "parts" in part else f"{_num(part['effect'])} {_interval(part)}"
        why = "both parts must hold" if "parts" in part else reason(part, n_tests)
        table.add_row(label, statement, f"[{style[verdict_]}]{verdict_}[/]", str(part["n_seeds"]), effect,
                      _p_adj(part), why)
    return table


def claims_text(claims: list[dict[str, Any]], width: int = 120) -> str:
    """`claims_table` rendered as plain text (no colour), e.g. for a log."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(claims_table(claims))
    return buf.getvalue()
