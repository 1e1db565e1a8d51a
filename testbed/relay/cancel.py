"""Loops that publish over MQTT end when they are cancelled, also when an await swallowed it.

Python 3.11's asyncio.wait_for (inside aiomqtt's publish) returns normally when a cancel lands
as its PUBACK arrives (fixed in 3.12). A loop that goes on after that never ends: in CI an
agent's teardown hung for 900 s, serve() waiting on a heartbeat that kept beating. The task
still counts the cancel as requested, so a loop asks after each publish.
"""

from __future__ import annotations

import asyncio

__all__ = ["end_if_cancel_was_swallowed"]


def end_if_cancel_was_swallowed() -> None:
    """Raise the CancelledError that an await of this task swallowed (call it in a loop's
    body, never in a `finally`, where a delivered cancel is still being handled)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
