"""The one schema of telemetry events (events.jsonl, `tb/<run>/events`, the TUI).

An event is a JSON object: `type`, `ts` (epoch seconds), `run`, `device` (or null),
`steps` ([start, end) or null), `seq` (the orchestrator's counter, null for events the
run owner makes) and the type's own fields. Types in use: agents_online, selection,
run_started, stage_started, downloaded, computed, uploaded, device_offline, device_silent,
deadline_missed, stage_interrupted, recovered, status_rejected, result_rejected, broker_lost, broker_back,
relay_finished, run_finished, run_failed, fault_injected, fault_restored, fault_failed, split_step,
patch_step, reselected.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["make_event"]


def make_event(etype: str, run: str, *, device: str | None = None, steps: Any = None, seq: int | None = None,
               **data: Any) -> dict[str, Any]:
    """One event of the schema above."""
    return {"seq": seq, "type": etype, "ts": time.time(), "run": run, "device": device,
            "steps": list(steps) if steps is not None else None, **data}
