"""What a multi-stage device result carries in its meta, typed at the one door
(relay/messages.py): the stage's timings, the scheduler's state and the task it answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from testbed.relay.messages import Fields, ordered, sched_scalars

__all__ = ["StageMeta", "stage_meta"]


@dataclass(frozen=True)
class StageMeta:
    """A multi-stage result's meta (methods/multistage/agent.py)."""

    t_recv: float
    t_send: float
    t_cmp_start: float | None
    t_cmp_end: float | None
    overrun_s: float
    cmp_real_s: float
    cmp_profile_s: float | None
    precision: str
    compute_dtype: str | None
    task: str | None  # the task id the result answers
    scheduler: str | None
    sched: dict[str, Any]  # the scheduler's scalars (JSON scalars or short lists of them)


def stage_meta(f: Fields) -> StageMeta:
    t_recv, t_send = f.epoch("t_recv", required=True), f.epoch("t_send", required=True)
    start, end = f.epoch("t_cmp_start"), f.epoch("t_cmp_end")
    ordered(f, "t_recv", t_recv, "t_send", t_send)
    ordered(f, "t_cmp_start", start, "t_cmp_end", end)
    return StageMeta(t_recv, t_send, start, end, f.duration("overrun_s", default=0.0),
                     f.duration("cmp_real_s", default=0.0), f.duration("cmp_profile_s"), f.text("precision") or "",
                     f.text("compute_dtype"), f.text("task"), f.text("scheduler"), sched_scalars(f))
