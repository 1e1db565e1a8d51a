"""A generation on a cell that `testbed up` keeps, run by that cell's supervisor.

The supervisor already holds torch, the edge server's model, the MS-SSIM reference and one
warm agent per device; `run_on_up_cell` sends it the scenario (a topology document) and
the options over the cell's control socket (the streaming op `generate`) and hands each
event to `on_event` as it happens. It imports neither torch nor the run owner: the warm
path of `testbed run --run ID`. Outputs (result.json, events.jsonl, image.png, logs/) are
written by the supervisor into `out_dir`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.emulation.control import call_stream, control_path
from testbed.errors import ResourceError
from testbed.model.topology import Topology

__all__ = ["run_on_up_cell"]


async def run_on_up_cell(run_id: str, topo: Topology, *, method: str = "multistage", selector: str | None = None,
                         t_max_s: float | None = None, e_max_j: float | None = None, fail: str | None = None,
                         out_dir: Path | None = None, on_event: Callable[[dict[str, Any]], None] | None = None,
                         started_at: float | None = None, confidence: float | None = None) -> dict[str, Any]:
    """One generation of `topo` on the up cell `run_id`; its result document."""
    path = control_path(run_id)
    if not path.exists():
        raise ResourceError(f"run {run_id} is not up (no control socket at {path}); "
                            f"start it with `testbed up FILE --run {run_id}`, or run without --run")
    doc = topo.model_dump(mode="json", exclude_unset=True)  # what the file said; the supervisor validates it again
    return await call_stream(path, "generate", on_event or (lambda _ev: None), topology=doc, method=method,
                             selector=selector, t_max_s=t_max_s, e_max_j=e_max_j, fail=fail,
                             out_dir=str(Path(out_dir).resolve()) if out_dir is not None else None,
                             started_at=started_at, confidence=confidence)
