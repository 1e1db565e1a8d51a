"""What a run is checked for before its cell comes up: the budgets, the method and its
selector, the `--fail` device, and — for a cold run, whose cell is the topology's as written —
the method's plan itself.

A bad option then exits 2 and infeasible budgets exit 3 before 20 devices come up (the
cell, the broker and the agents take seconds; a plan takes milliseconds and imports no
torch). A run on an up cell is
planned on that cell's links, rates and energy history as they are when it runs (the up
cell's supervisor plans it), so only the inputs are checked here.
"""

from __future__ import annotations

import math
from typing import Any

from testbed import methods
from testbed.errors import InputError
from testbed.model.topology import Topology

__all__ = ["check_budgets", "check_fail_device", "check_method", "plan_cold_run"]


def check_budgets(t_max_s: float | None, e_max_j: float | None) -> None:
    """--tmax / --emax, when given, are positive finite numbers (bad input, not infeasible)."""
    for option, value, unit in (("--tmax", t_max_s, "s"), ("--emax", e_max_j, "J")):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise InputError(f"{option} {value:g}: a budget is a positive number of {unit}; "
                             "leave it out for the topology's")


def check_method(method: str, selector: str | None, fail: str | None,
                 confidence: float | None = None) -> methods.MethodSpec:
    """The method exists, takes this selector (and --confidence, if given: a P in (0, 1)), and
    recovers from a lost device if --fail asks it to."""
    spec = methods.method(method)
    spec.make(selector)  # a method with its own device choice refuses a --selector
    spec.check_confidence(confidence)
    if fail and not spec.recovers:
        raise InputError(f"--fail applies to methods that recover from a lost device "
                         f"({', '.join(m.name for m in methods.methods() if m.recovers)}); "
                         f"{method}: {spec.notes.get('recovery', 'no recovery')}")
    return spec


def check_fail_device(topo: Topology, device_ids: list[str], fail: str | None) -> None:
    """--fail names a device of the topology."""
    if fail is not None and fail not in device_ids:
        raise InputError(f"--fail {fail!r}: {topo.name} has no such device; its devices: "
                         f"{', '.join(device_ids[:8])}{', ...' if len(device_ids) > 8 else ''}")


def plan_cold_run(topo: Topology, method: str, selector: str | None, t_max_s: float | None,
                  e_max_j: float | None, fail: str | None, confidence: float | None = None) -> Any:
    """The plan a cold run of `method` will make (its cell starts as the topology says, with
    no energy spent yet): InfeasibleError (exit 3) when the budgets admit none, InputError
    (exit 2) when --fail names a device the plan does not select."""
    from testbed.methods.base import PlanContext
    from testbed.model.impairments import link_impairments
    from testbed.model.radio import compute_links
    from testbed.model.topology import place

    check_budgets(t_max_s, e_max_j)
    spec = check_method(method, selector, fail, confidence)
    links = compute_links(topo, place(topo))
    check_fail_device(topo, [lk.id for lk in links], fail)
    t = topo.budgets.t_max_s if t_max_s is None else t_max_s
    e = topo.budgets.e_max_j if e_max_j is None else e_max_j
    plan = spec.make(selector).plan(PlanContext(topo, links, t, e, topo.seed, {}, link_impairments(topo, links),
                                                confidence=confidence))
    if fail is not None and fail not in plan.selected:
        raise InputError(f"--fail {fail}: not a device the plan selects (selected: {', '.join(plan.selected)}); "
                         "pick one of those")
    return plan
