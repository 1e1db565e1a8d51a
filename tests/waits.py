"""Waiting on the event itself, not for a guessed time: a loaded machine (a CI runner, other
suites on the same host) makes every guess wrong now and then."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(cond: Callable[[], T], timeout_s: float, what: str, every_s: float = 0.05) -> T:
    """`cond()` once it is true (its value); AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)


def wait_listening(netns: str, port: int, timeout_s: float = 30.0) -> None:
    """Until a TCP socket listens on `port` inside the network namespace `netns` (a path):
    an iperf3 server started a moment ago may not be listening yet."""
    def listening() -> bool:
        r = subprocess.run(["nsenter", f"--net={netns}", "ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                           text=True)
        return bool(r.stdout.strip())

    wait_until(listening, timeout_s, f"a listener on port {port} in {netns}")
