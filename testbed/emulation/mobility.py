"""Random-waypoint mobility: device positions over time (pure, seeded).

Each device walks at `speed_mps` towards a waypoint drawn uniformly in the area, pauses
`pause_s` there, then draws the next. `step(dt_s)` advances every device; the emulation
recomputes rates from the new distances (radio.link_for_position) and applies them live.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from testbed.model.topology import Area, MobilityConfig, derive_rng

__all__ = ["Walker", "RandomWaypoint"]


@dataclass
class Walker:
    id: str
    x_m: float
    y_m: float
    target_x_m: float
    target_y_m: float
    pause_left_s: float = 0.0


class RandomWaypoint:
    def __init__(self, cfg: MobilityConfig, area: Area, seed: int, start: dict[str, tuple[float, float]]):
        self.cfg = cfg
        self.area = area
        self.rng = derive_rng(seed, "mobility")
        self.walkers = {i: Walker(i, x, y, *self._waypoint()) for i, (x, y) in start.items()}

    def _waypoint(self) -> tuple[float, float]:
        return float(self.rng.uniform(0, self.area.width_m)), float(self.rng.uniform(0, self.area.height_m))

    def step(self, dt_s: float) -> dict[str, tuple[float, float]]:
        """Advance every device by dt_s; return the new positions."""
        for w in self.walkers.values():
            left = dt_s
            while left > 1e-12:
                if w.pause_left_s > 0:
                    used = min(w.pause_left_s, left)
                    w.pause_left_s -= used
                    left -= used
                    if w.pause_left_s <= 0:
                        w.target_x_m, w.target_y_m = self._waypoint()
                    continue
                dist = math.hypot(w.target_x_m - w.x_m, w.target_y_m - w.y_m)
                reach_s = dist / self.cfg.speed_mps
                if reach_s > left:
                    f = left * self.cfg.speed_mps / dist
                    w.x_m += (w.target_x_m - w.x_m) * f
                    w.y_m += (w.target_y_m - w.y_m) * f
                    left = 0
                else:
                    w.x_m, w.y_m = w.target_x_m, w.target_y_m
                    left -= reach_s
                    if self.cfg.pause_s > 0:
                        w.pause_left_s = self.cfg.pause_s
                    else:
                        w.target_x_m, w.target_y_m = self._waypoint()
        return self.positions()

    def positions(self) -> dict[str, tuple[float, float]]:
        return {i: (w.x_m, w.y_m) for i, w in self.walkers.items()}
