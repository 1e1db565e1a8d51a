"""Where a run's start-up time went: `meta.startup` of the result (measured wall clock).

Phases are recorded as [start, end] seconds after the command started (the process start
of `testbed run`, or the session's start for library users), so that a reader sees what
overlapped: on a cold run the agent template's imports, the cell, the broker and the
edge server's model run at the same time. `first_stage_s` is when the first latent went
out (the first `stage_started`, or split's `run_started`). Light: the CLI imports it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["StartupClock", "command_started_at", "FIRST_STAGE_EVENTS"]

#: The events that mark the first latent on the wire: multi-stage's first task, or split's run start.
FIRST_STAGE_EVENTS = ("stage_started", "run_started")


def command_started_at() -> float:
    """This process's start, in epoch seconds (10 ms resolution): the command's own clock
    starts before the interpreter, not after its imports."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        start_ticks = int(fields[19])  # field 22 of proc(5): starttime, clock ticks after boot
        age_s = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - max(age_s, 0.0)


class StartupClock:
    """Phases of one start-up, each [start, end] in seconds after `t0` (epoch seconds)."""

    def __init__(self, t0: float | None = None, path: str = "cold"):
        self.t0 = time.time() if t0 is None else float(t0)
        self.path = path  # cold (made here), warm (the up cell's supervisor ran it), attached, given
        self.phases: dict[str, list[float]] = {}
        self.first_stage_s: float | None = None
        self.notes: dict[str, Any] = {}
        self._included: list[StartupClock] = []  # another process's clock (a cold run's worker)

    def include(self, other: StartupClock) -> None:
        """Show `other`'s phases too (those this clock lacks), shifted to this clock's start:
        a cold run's worker made the template and the server's model for the command."""
        self._included.append(other)

    def all_phases(self) -> dict[str, list[float]]:
        phases = dict(self.phases)
        for other in self._included:
            shift = other.t0 - self.t0
            for name, (a, b) in other.phases.items():
                phases.setdefault(name, [round(a + shift, 4), round(b + shift, 4)])
        return phases

    def mark(self, name: str, start: float, end: float | None = None) -> None:
        """A phase from `start` to `end` (epoch seconds; `end` default now)."""
        end = time.time() if end is None else end
        self.phases[name] = [round(start - self.t0, 4), round(end - self.t0, 4)]

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = time.time()
        try:
            yield
        finally:
            self.mark(name, start)

    def seconds(self, name: str) -> float | None:
        """How long a phase took."""
        p = self.all_phases().get(name)
        return None if p is None else round(p[1] - p[0], 4)

    def feed(self, ev: dict[str, Any]) -> None:
        """An event listener: the first latent on the wire ends the start-up."""
        if self.first_stage_s is None and ev.get("type") in FIRST_STAGE_EVENTS:
            self.first_stage_s = round(float(ev.get("ts") or time.time()) - self.t0, 4)

    def to_json(self) -> dict[str, Any]:
        phases = self.all_phases()
        doc: dict[str, Any] = {"what": "measured wall clock here: seconds after the command started",
                               "path": self.path, "first_stage_s": self.first_stage_s, "phases": phases}
        doc |= {f"{name}_s": round(b - a, 4) for name, (a, b) in phases.items()}
        return doc | self.notes
