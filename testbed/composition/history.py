"""Energy spent per device, kept in the cell's state directory (`energy.json`).

Consecutive `testbed run --run ID` calls on a cell that `testbed up` keeps, and the runs
of a sweep (one run owner), add to it; the `fair` selection strategy reads it, so that
devices that have spent more are picked less.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

__all__ = ["EnergyHistory"]


class EnergyHistory:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "energy.json"

    def load(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float))}

    def add(self, spent_j: dict[str, float]) -> dict[str, float]:
        """Add one generation's energy per device; returns the new totals."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:  # clients of one cell may finish together
            fcntl.flock(lock, fcntl.LOCK_EX)
            totals = self.load()
            for dev, e in spent_j.items():
                totals[dev] = totals.get(dev, 0.0) + float(e)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(totals, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        return totals
