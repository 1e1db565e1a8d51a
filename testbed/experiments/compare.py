"""Compare two runs (result.json) or two sweeps (results.csv): what differs, number by
number, each with its kind — measured, emulated or modelled (a run's `meta.labels`, a
sweep's columns.json), or a setting / record — and the difference b - a and ratio b / a.

Pure: documents in, a `Comparison` out (`testbed compare` prints it). Runs compare their
settings, their totals and, stage by stage, their times and energy. Sweeps compare the
settings of sweep.json, then per method the mean of every number over the (T_max, E_max,
seed) points both sweeps ran, and per point the mean over the seeds both ran; points one
sweep lacks are listed, never averaged in.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.errors import InputError

__all__ = ["Comparison", "Difference", "compare_paths", "compare_runs", "compare_sweeps", "load_side"]

SETTING, RECORD = "setting", "record"
#: A run's settings and records (its numbers' kinds come from meta.labels): (path, kind).
_RUN_FIELDS: tuple[tuple[str, str], ...] = (
    ("method", SETTING), ("strategy", SETTING), ("t_max_s", SETTING), ("e_max_j", SETTING),
    ("meta.topology", SETTING), ("meta.seed", SETTING), ("meta.model", SETTING), ("meta.compute", SETTING),
    ("meta.prompt", SETTING), ("meta.backend", SETTING), ("meta.delay_path", SETTING),
    ("meta.git_commit", SETTING),
    ("relay_order", RECORD), ("total_steps", RECORD), ("recovered", RECORD), ("within_budget.latency", RECORD),
    ("within_budget.energy", RECORD),
)
#: A run's numbers, in this order; the stage sums are derived (experiments.expectations).
_RUN_NUMBERS = ("latency_s", "predicted_latency_s", "energy_j", "predicted_energy_j", "ms_ssim", "t_tran_s",
                "t_cmp_s", "cmp_real_s", "overrun_s")
_STAGE_NUMBERS = ("t_down_s", "t_cmp_s", "t_up_s", "energy_j")
#: sweep.json's settings worth comparing.
_SWEEP_SETTINGS = ("topology", "t_max_s", "e_max_j", "seeds", "runs", "backend", "commit")
_POINT_KEY = ("method", "strategy", "t_max_s", "e_max_j")


@dataclass(frozen=True)
class Difference:
    """One compared value: where (`scope`: "run", "stage 1", "multistage:dp", "split T_max 2
    E_max 50"), what (`name`), its kind, both values, b - a and b / a (numbers only)."""

    scope: str
    name: str
    kind: str
    a: Any
    b: Any

    @property
    def numeric(self) -> bool:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (self.a, self.b))

    @property
    def differs(self) -> bool:
        if self.numeric:
            return not math.isclose(float(self.a), float(self.b), rel_tol=1e-9, abs_tol=1e-12)
        return self.a != self.b

    @property
    def delta(self) -> float | None:
        return float(self.b) - float(self.a) if self.numeric else None

    @property
    def ratio(self) -> float | None:
        return float(self.b) / float(self.a) if self.numeric and float(self.a) != 0 else None

    def to_json(self) -> dict[str, Any]:
        return {"scope": self.scope, "name": self.name, "kind": self.kind, "a": self.a, "b": self.b,
                "delta": self.delta, "ratio": self.ratio, "differs": self.differs}


@dataclass
class Comparison:
    """What `compare_runs` / `compare_sweeps` found. `rows` holds every compared value
    (equal ones too); `only_a` / `only_b` name what one side has and the other lacks."""

    what: str  # "runs" | "sweeps"
    a: str
    b: str
    rows: list[Difference] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def differences(self) -> list[Difference]:
        return [r for r in self.rows if r.differs]

    def to_json(self) -> dict[str, Any]:
        return {"compared": self.what, "a": self.a, "b": self.b,
                "differences": [r.to_json() for r in self.differences],
                "equal": [{"scope": r.scope, "name": r.name, "kind": r.kind, "value": r.a}
                          for r in self.rows if not r.differs],
                "only_a": self.only_a, "only_b": self.only_b, "notes": self.notes,
                "kinds": {"measured": "measured on this machine", "emulated": "a device profile's time the run "
                          "waited out", "modelled": "a formula, not a measurement", SETTING: "what was asked for",
                          RECORD: "what the run did (counted, not timed)"}}


# ---- loading ------------------------------------------------------------------------------

def load_side(path: Path) -> tuple[str, Any]:
    """("run", result document) or ("sweep", (rows, columns.json, sweep.json)) from a run's
    folder or result.json, or a sweep's folder or results.csv. InputError when it is neither."""
    path = Path(path)
    if path.is_dir():
        run, sweep = path / "result.json", path / "results.csv"
        if run.is_file() and sweep.is_file():
            raise InputError(f"{path}: holds both result.json and results.csv; give the file to compare")
        if not run.is_file() and not sweep.is_file():
            raise InputError(f"{path}: no result.json (a run's --out folder) or results.csv (a sweep's folder)")
        path = run if run.is_file() else sweep
    if not path.is_file():
        raise InputError(f"{path}: no such file or folder; give a run's folder or result.json, or a sweep's "
                         "folder or results.csv")
    if path.suffix == ".csv":
        from testbed.experiments.sweep import read_rows

        try:
            rows = read_rows(path)
        except (ValueError, KeyError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: not a sweep's results.csv ({e})") from None
        if rows and not set(_POINT_KEY) | {"seed"} <= set(rows[0]):
            raise InputError(f"{path}: not a sweep's results.csv (no {', '.join(_POINT_KEY)}, seed columns)")
        return "sweep", (rows, _json_beside(path, "columns.json"), _json_beside(path, "sweep.json"))
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not JSON ({e}); give a run's result.json") from None
    if not isinstance(doc, dict) or "latency_s" not in doc or "stages" not in doc:
        raise InputError(f"{path}: not a run's result.json (no latency_s, stages)")
    return "run", doc


def _json_beside(path: Path, name: str) -> dict[str, Any]:
    p = path.parent / name
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except json.JSONDecodeError:
        return {}


def compare_paths(a: Path, b: Path) -> Comparison:
    """Two runs or two sweeps, found from their paths (see load_side)."""
    kind_a, side_a = load_side(a)
    kind_b, side_b = load_side(b)
    if kind_a != kind_b:
        raise InputError(f"{a} is a {kind_a} and {b} a {kind_b}: compare two runs (result.json) or two sweeps "
                         "(results.csv)")
    if kind_a == "run":
        return compare_runs(side_a, side_b, str(a), str(b))
    return compare_sweeps(*side_a, *side_b, str(a), str(b))


# ---- runs -----------------------------------------------------------------------------------

def _get(doc: dict[str, Any], dotted: str) -> Any:
    cur: Any = doc
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    if isinstance(cur, list) and dotted == "recovered":
        return len(cur)  # how many recoveries (their details are in the documents)
    if isinstance(cur, list):
        return " -> ".join(map(str, cur))
    return cur


def _run_kind(doc: dict[str, Any], name: str) -> str:
    """A run's number's kind from its own meta.labels (the run owner's), else from the
    labels its compute mode gives (older documents)."""
    meta = doc.get("meta") or {}
    label = (meta.get("labels") or {}).get(name)
    if label is None:
        from testbed.composition.meta import number_labels

        label = number_labels(str(meta.get("compute") or "profile")).get(name)
    return str(label["kind"]) if label else RECORD


def _joint_kind(ka: str, kb: str) -> str:
    return ka if ka == kb else f"{ka} / {kb}"  # e.g. t_cmp emulated in one run, measured in the other


def compare_runs(a: dict[str, Any], b: dict[str, Any], name_a: str = "a", name_b: str = "b") -> Comparison:
    """Two result documents: settings, totals, then stage by stage (stage i of each)."""
    from testbed.experiments.expectations import derived_metrics

    cmp = Comparison("runs", name_a, name_b)
    for path, kind in _RUN_FIELDS:
        cmp.rows.append(Difference("run", path, kind, _get(a, path), _get(b, path)))
    da, db = derived_metrics(a), derived_metrics(b)
    for name in _RUN_NUMBERS:
        va = a.get(name, da.get(name))
        vb = b.get(name, db.get(name))
        if va is None and vb is None:
            continue
        cmp.rows.append(Difference("run", name, _joint_kind(_run_kind(a, name), _run_kind(b, name)), va, vb))
    sa, sb = a.get("stages") or [], b.get("stages") or []
    for i in range(max(len(sa), len(sb))):
        scope = f"stage {i + 1}"
        if i >= len(sa) or i >= len(sb):
            longer, only = (sb, cmp.only_b) if i >= len(sa) else (sa, cmp.only_a)
            only.append(f"{scope} ({longer[i].get('device')})")
            continue
        cmp.rows.append(Difference(scope, "device", RECORD, sa[i].get("device"), sb[i].get("device")))
        cmp.rows.append(Difference(scope, "steps", RECORD, _get(sa[i], "steps"), _get(sb[i], "steps")))
        for name in _STAGE_NUMBERS:
            if sa[i].get(name) is None and sb[i].get(name) is None:
                continue
            cmp.rows.append(Difference(scope, name, _joint_kind(_run_kind(a, name), _run_kind(b, name)),
                                       sa[i].get(name), sb[i].get(name)))
    if _get(a, "meta.git_commit") != _get(b, "meta.git_commit"):
        cmp.notes.append("the runs come from different commits (meta.git_commit)")
    return cmp


# ---- sweeps ---------------------------------------------------------------------------------

def _column_kinds(columns: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, str]:
    """Column -> kind from columns.json, or from the sweep's own column table when it is missing."""
    if columns.get("columns"):
        return {c["name"]: c["kind"] for c in columns["columns"]}
    from testbed.experiments.sweep import column_labels

    compute = next((r.get("compute") for r in rows if r.get("compute")), "profile")
    return {c["name"]: c["kind"] for c in column_labels(str(compute))["columns"]}


def _spec(row: dict[str, Any]) -> str:
    from testbed.experiments.sweep import row_key

    return row_key(row)


def _numeric_columns(kinds: dict[str, str]) -> list[str]:
    """The columns averaged: every number but the point's own coordinates."""
    skip = {"t_max_s", "e_max_j", "seed", "method", "strategy", "selector", "compute", "selected", "run", "image", "error"}
    return [c for c in kinds if c not in skip]


def _mean(values: list[Any]) -> float | None:
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return sum(nums) / len(nums) if nums else None


def compare_sweeps(rows_a: list[dict[str, Any]], columns_a: dict[str, Any], sweep_a: dict[str, Any],
                   rows_b: list[dict[str, Any]], columns_b: dict[str, Any], sweep_b: dict[str, Any],
                   name_a: str = "a", name_b: str = "b") -> Comparison:
    """Two sweeps: sweep.json's settings; per method and per (method, T_max, E_max) point the
    mean of every number over the points and seeds both sweeps ran (an infeasible point's
    empty MS-SSIM is left out of its mean; `feasible` counts it)."""
    cmp = Comparison("sweeps", name_a, name_b)
    for key in _SWEEP_SETTINGS:
        if key in sweep_a or key in sweep_b:
            cmp.rows.append(Difference("sweep", key, SETTING, _flat(sweep_a.get(key)), _flat(sweep_b.get(key))))
    ka, kb = _column_kinds(columns_a, rows_a), _column_kinds(columns_b, rows_b)
    columns = [c for c in _numeric_columns(ka) if c in kb]

    def index(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
        return {(_spec(r), float(r["t_max_s"]), float(r["e_max_j"]), int(r["seed"])): r for r in rows}

    ia, ib = index(rows_a), index(rows_b)
    common = sorted(set(ia) & set(ib), key=str)
    cmp.only_a = [_point_name(k) for k in sorted(set(ia) - set(ib), key=str)]
    cmp.only_b = [_point_name(k) for k in sorted(set(ib) - set(ia), key=str)]
    if not common:
        cmp.notes.append("the sweeps share no (method, T_max, E_max, seed) point: nothing to average")
        return cmp
    by_spec: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    by_point: dict[tuple[Any, ...], list[tuple[Any, ...]]] = defaultdict(list)
    for k in common:
        by_spec[k[0]].append(k)
        by_point[k[:3]].append(k)
    for spec, keys in by_spec.items():
        _mean_rows(cmp, f"{spec} (mean of {len(keys)} runs)", keys, columns, ia, ib, ka, kb)
    for point, keys in sorted(by_point.items(), key=lambda kv: str(kv[0])):
        scope = f"{point[0]} T_max {point[1]:g} E_max {point[2]:g} ({len(keys)} seed{'s' * (len(keys) > 1)})"
        _mean_rows(cmp, scope, keys, columns, ia, ib, ka, kb)
    if sweep_a.get("commit") != sweep_b.get("commit"):
        cmp.notes.append("the sweeps come from different commits (sweep.json)")
    return cmp


def _mean_rows(cmp: Comparison, scope: str, keys: list[tuple[Any, ...]], columns: list[str],
               ia: dict[tuple[Any, ...], dict[str, Any]], ib: dict[tuple[Any, ...], dict[str, Any]],
               ka: dict[str, str], kb: dict[str, str]) -> None:
    for col in columns:
        va, vb = _mean([ia[k].get(col) for k in keys]), _mean([ib[k].get(col) for k in keys])
        if va is None and vb is None:
            continue
        cmp.rows.append(Difference(scope, col, _joint_kind(ka[col], kb[col]), va, vb))


def _point_name(key: tuple[Any, ...]) -> str:
    return f"{key[0]} T_max {key[1]:g} E_max {key[2]:g} seed {key[3]}"


def _flat(v: Any) -> Any:
    return ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) if isinstance(v, list) else v
