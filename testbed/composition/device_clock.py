"""A Swarm device's clock: its host's (`device_time`), and the agent's, disciplined to the
run owner's (`discipline`).

Every timestamp an agent reports (a task's arrival, a result's departure) is set against
the edge server's: t_down = agent receive - server publish. On one host both read one
kernel clock; across hosts they would not agree. The cell measures each device's offset
over its control plane (swarm_cell.measure_clock) and hands it to the agent, whose
`time.time` then reads the run owner's clock — as a device disciplined by NTP would — so
no measured number mixes two hosts' clocks. (asyncio and the MQTT client keep time with
`time.monotonic`, which is left alone.)

All nodes of a cluster on one machine share one kernel clock: `TESTBED_CLOCK_SKEW_S`
(set by the cell for chosen devices, `TESTBED_SWARM_CLOCK_SKEW=dev01=7.5,...` on the run
owner) makes a device's clock run that far ahead, so that tests and benchmarks see the
correction work.
"""

from __future__ import annotations

import os
import time

__all__ = ["SKEW_ENV", "SKEWS_ENV", "skew_s", "device_time", "discipline", "parse_skews"]

SKEW_ENV = "TESTBED_CLOCK_SKEW_S"  # in a device's container: its clock's injected error
SKEWS_ENV = "TESTBED_SWARM_CLOCK_SKEW"  # on the run owner: "dev01=7.5,dev02=-3"
_real_time = time.time
_real_time_ns = time.time_ns


def skew_s() -> float:
    try:
        return float(os.environ.get(SKEW_ENV) or 0.0)
    except ValueError:
        return 0.0


def device_time() -> float:
    """This device's own clock (its host's, plus an injected skew)."""
    return _real_time() + skew_s()


def discipline(offset_s: float) -> None:
    """From now on `time.time()` in this process reads the run owner's clock: the device's
    own minus its measured offset (device - run owner)."""
    shift = skew_s() - float(offset_s)
    shift_ns = round(shift * 1e9)
    time.time = lambda: _real_time() + shift  # type: ignore[assignment]
    time.time_ns = lambda: _real_time_ns() + shift_ns  # type: ignore[assignment]


def parse_skews(text: str | None) -> dict[str, float]:
    """`dev01=7.5,dev02=-3` -> {"dev01": 7.5, "dev02": -3.0}; malformed parts are errors."""
    from testbed.errors import InputError

    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        dev, sep, value = part.partition("=")
        try:
            out[dev.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not dev.strip():
            raise InputError(f"{SKEWS_ENV}: {part!r} is not DEVICE=SECONDS (e.g. dev01=7.5)")
    return out
