"""Run a coroutine on its own event loop in a thread that entered a network namespace.

A socket belongs to the namespace of the thread that created it: the orchestrator's MQTT
client, created on such a loop (and in the executor threads that loop starts, which
inherit the namespace), reaches the edge server's 198.18.0.1 without the host's route.
Composition layer (uses emulation's setns primitive for the relay's client).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Any

from testbed.errors import RunFailedError

__all__ = ["run_in_netns"]


async def run_in_netns(netns: str, factory: Callable[[], Any], *, name: str = "tb-netns-loop",
                       join_timeout_s: float = 15.0) -> Any:
    """Await `factory()` on a fresh loop in a thread inside `netns` (a name under
    /run/netns or a path). Cancelling the caller cancels the coroutine."""
    from testbed.emulation.nsutil import netns_path, setns_fd

    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()
    box: dict[str, Any] = {}
    fd = os.open(netns_path(netns), os.O_RDONLY)

    def settle(ok: bool, value: Any) -> None:
        if not done.done() and not box.get("abandoned"):
            (done.set_result if ok else done.set_exception)(value)

    def body() -> None:
        try:
            setns_fd(fd)  # this thread only; the executor threads it creates inherit it
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting caller
            loop.call_soon_threadsafe(settle, False, e)
            return
        finally:
            os.close(fd)
        inner = asyncio.new_event_loop()
        box["loop"] = inner
        try:
            task = inner.create_task(factory())
            box["task"] = task
            res = inner.run_until_complete(task)
            loop.call_soon_threadsafe(settle, True, res)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting caller
            err = e if not isinstance(e, asyncio.CancelledError) else RunFailedError(f"{name}: cancelled")
            loop.call_soon_threadsafe(settle, False, err)
        finally:
            inner.run_until_complete(inner.shutdown_default_executor())
            inner.close()

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        box["abandoned"] = True  # the caller is gone: nobody will read the outcome
        inner, task = box.get("loop"), box.get("task")
        if inner is not None and task is not None and not inner.is_closed():
            inner.call_soon_threadsafe(task.cancel)
        await asyncio.to_thread(thread.join, join_timeout_s)
        raise
