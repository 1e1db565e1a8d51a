"""Scenario `expect:` blocks: check a run's result JSON against bounds, with a readable diff.

Pure (no I/O). A topology may carry `expect: {latency_s: {max: 2.5}, ms_ssim: {min: 0.6},
recovered: {min: 1}}`; `check_expectations()` returns one `Failure` per bound that does
not hold, `format_report()` renders every bound (held or not) as a table-like diff, and
`enforce_expectations()` raises `ExpectationFailed` (exit code 1) when any fails.

A key is a metric of the result: a top-level field (`latency_s`, `energy_j`, `ms_ssim`,
`recovered`, ...), a derived metric (`DERIVED`: `selected_count`, `steps_total`,
`t_tran_s`, `t_cmp_s`, `cmp_real_s`, `t_tran_share`, `overrun_s`, `stages_count`,
`devices_used`), or a
dotted path into the document (`meta.emulation.setup_s`, `stages.0.t_cmp_s`). Booleans
count as 0/1; a list is measured by its length; an empty bound `{}` only asks that the
field be present (any value, e.g. `recovered.0.took_over: {}`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from testbed.errors import ExpectationFailed

__all__ = [
    "DERIVED",
    "Failure",
    "derived_metrics",
    "metric_value",
    "check_expectations",
    "format_report",
    "enforce_expectations",
]

#: Metrics computed from `stages` (and `selected`) of any run, multi-stage or split.
DERIVED: dict[str, str] = {
    "selected_count": "number of selected devices",
    "stages_count": "number of stage records (split: one per denoising step; patch: one per band and step)",
    "steps_total": "denoising steps done in total (stages[].steps: a count, or a [start, end) range that counts "
                   "once however many bands ran it)",
    "t_tran_s": "time on the air: sum of stages[].t_down_s + t_up_s",
    "t_cmp_s": "compute time: sum of stages[].t_cmp_s (emulated in compute: profile)",
    "cmp_real_s": "the local model's real compute on this CPU: sum of stages[].cmp_real_s (measured)",
    "t_tran_share": "t_tran_s / (t_tran_s + t_cmp_s)",
    "overrun_s": "sum of stages[].overrun_s (real compute slower than the profile)",
    "devices_used": "distinct devices that ran a stage (split: head and tail)",
}


@dataclass(frozen=True)
class Failure:
    """One bound that did not hold; `message` is the human-readable line."""

    key: str
    value: float | None
    min: float | None
    max: float | None
    message: str

    def __str__(self) -> str:
        return self.message


def _num(x: Any) -> float | None:
    if x is None:
        return None
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, (int, float)):
        return float(x)
    return None


def derived_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The `DERIVED` metrics of a result document (missing stage fields count as 0)."""
    stages = result.get("stages") or []
    t_down = sum(_num(s.get("t_down_s")) or 0.0 for s in stages)
    t_up = sum(_num(s.get("t_up_s")) or 0.0 for s in stages)
    t_cmp = sum(_num(s.get("t_cmp_s")) or 0.0 for s in stages)
    t_tran = t_down + t_up
    devices: set[str] = set()
    for s in stages:
        for d in str(s.get("device", "")).replace(">", "+").split("+"):
            if d:
                devices.add(d)
    selected = result.get("selected") or []
    return {
        "selected_count": float(len(selected)),
        "stages_count": float(len(stages)),
        "steps_total": float(_steps_done(stages)),
        "t_tran_s": t_tran,
        "t_cmp_s": t_cmp,
        "cmp_real_s": sum(_num(s.get("cmp_real_s")) or 0.0 for s in stages),
        "t_tran_share": t_tran / (t_tran + t_cmp) if (t_tran + t_cmp) > 0 else 0.0,
        "overrun_s": sum(_num(s.get("overrun_s")) or 0.0 for s in stages),
        "devices_used": float(len(devices)),
    }


def _steps_done(stages: list[Any]) -> int:
    """Steps of the stage records: counts add up; [start, end) ranges (the relay's) count
    each step once, so the bands of a patch run that computed one step together count 1."""
    covered: set[int] = set()
    counted = 0
    for s in stages:
        v = s.get("steps")
        if isinstance(v, (list, tuple)) and len(v) == 2:
            covered.update(range(int(v[0]), int(v[1])))
        else:
            counted += int(v or 0)
    return counted + len(covered)


_MISSING = object()


def _lookup(doc: Any, path: str) -> Any:
    cur = doc
    for part in path.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.lstrip("-").isdigit() and -len(cur) <= int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return _MISSING
    return cur


def metric_value(result: Mapping[str, Any], key: str) -> tuple[float | None, str]:
    """(value, note) of `key` in `result`; value None when absent or not a number."""
    if key in result:
        raw = result[key]
    elif key in DERIVED:
        return derived_metrics(result)[key], ""
    else:
        raw = _lookup(result, key)
        if raw is _MISSING:
            return None, "absent"
    if isinstance(raw, (list, tuple, dict)):
        return float(len(raw)), f"length of {type(raw).__name__}"
    v = _num(raw)
    if v is None:
        return None, f"not a number ({raw!r})" if raw is not None else "null"
    return v, ""


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isfinite(x) and x == int(x) and abs(x) < 1e9:
        return str(int(x))
    return f"{x:.4g}"


def _bound_of(b: Any) -> tuple[float | None, float | None]:
    if hasattr(b, "min") and hasattr(b, "max") and not isinstance(b, Mapping):
        return b.min, b.max
    if isinstance(b, Mapping):
        return b.get("min"), b.get("max")
    raise TypeError(f"expect bound must be {{min, max}}, got {b!r}")


def _check_one(key: str, bound: Any, result: Mapping[str, Any]) -> tuple[bool, str, float | None]:
    lo, hi = _bound_of(bound)
    if lo is None and hi is None:  # `{}`: the field must be present (any value)
        raw = result[key] if key in result else _lookup(result, key)
        if raw is _MISSING or raw is None:
            return False, f"{key}: absent in the result; expected present", None
        return True, f"{key} = {raw!r}, ok present", None
    value, note = metric_value(result, key)
    want = f"in [{_fmt(lo)}, {_fmt(hi)}]"
    if value is None:
        known = sorted(k for k in result if _num(result[k]) is not None) + sorted(DERIVED)
        why = f"{key}: {note} in the result; expected {want}"
        if note == "absent":
            why += f" (known metrics: {', '.join(known)})"
        return False, why, None
    shown = f"{key} = {_fmt(value)}" + (f" ({note})" if note else "")
    if math.isnan(value):
        return False, f"{shown}, expected {want}: value is NaN", value
    if lo is not None and value < lo:
        return False, f"{shown}, expected >= {_fmt(lo)} (under by {_fmt(lo - value)})", value
    if hi is not None and value > hi:
        return False, f"{shown}, expected <= {_fmt(hi)} (over by {_fmt(value - hi)})", value
    return True, f"{shown}, ok {want}", value


def check_expectations(expect: Mapping[str, Any], result: Mapping[str, Any]) -> list[Failure]:
    """Every bound of `expect` that `result` (a run's result JSON) does not meet."""
    failures = []
    for key, bound in expect.items():
        ok, msg, value = _check_one(key, bound, result)
        if not ok:
            lo, hi = _bound_of(bound)
            failures.append(Failure(key=key, value=value, min=lo, max=hi, message=msg))
    return failures


def format_report(expect: Mapping[str, Any], result: Mapping[str, Any]) -> str:
    """All bounds, one line each, `-` marking a failure and `+` a pass (diff style)."""
    lines = []
    for key, bound in expect.items():
        ok, msg, _ = _check_one(key, bound, result)
        lines.append(f"{'+' if ok else '-'} {msg}")
    return "\n".join(lines)


def enforce_expectations(expect: Mapping[str, Any], result: Mapping[str, Any], scenario: str = "",
                         console: Any = None) -> None:
    """Raise `ExpectationFailed` (exit 1) with the diff when a bound does not hold; with a
    rich `console`, print the report there when all hold (nothing when `expect` is empty)."""
    failures = check_expectations(expect, result)
    if expect and not failures and console is not None:
        console.print(f"expectations: all {len(expect)} held\n{format_report(expect, result)}",
                      highlight=False, markup=False)
    if failures:
        where = f"scenario {scenario!r}: " if scenario else ""
        raise ExpectationFailed(
            f"{where}{len(failures)} of {len(expect)} expectations failed "
            f"(fix the run or the scenario's `expect:` block)\n{format_report(expect, result)}"
        )
