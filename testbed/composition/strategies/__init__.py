"""Collaboration strategies, by method name. A new strategy is a module here and one line
in METHODS; the run owner never changes (docs/design.md, "Collaboration strategies")."""

from __future__ import annotations

from testbed.composition.strategies.base import Collaboration, Outcome, Plan, PlanContext, RelaySettings, RunContext
from testbed.composition.strategies.multistage import Multistage
from testbed.composition.strategies.patch import Patch
from testbed.composition.strategies.split import Split
from testbed.errors import InputError

__all__ = ["METHODS", "make_strategy", "Collaboration", "Outcome", "Plan", "PlanContext", "RelaySettings",
           "RunContext", "Multistage", "Split", "Patch"]

METHODS: dict[str, type] = {"multistage": Multistage, "split": Split, "patch": Patch}


def make_strategy(method: str, strategy: str = "dp") -> Collaboration:
    """The strategy object for `--method METHOD --strategy STRATEGY`."""
    cls = METHODS.get(method)
    if cls is None:
        raise InputError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    return cls(strategy)
