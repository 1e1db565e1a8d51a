"""SIGINT, SIGTERM and SIGHUP end a command the same way: its teardown runs, then it exits
128 + the signal's number.

`run(coro)` is `asyncio.run(coro)` where each of the three signals cancels the command's
main task, as Ctrl-C does under asyncio.run: the run owner's `async with` blocks take the
cell down (namespaces, links, cgroups, broker, template, agents, the run directory), and
the command exits 128 + N (143 for SIGTERM, 129 for SIGHUP, 130 for SIGINT). A second
signal while it tears down is only reported: interrupting a teardown is what leaves
leftovers (`kill -9` still ends it; the broker, template and agents then die with it).
`run_app(app)` does the same for the Textual app, asking it to exit (its ExitApp handler
waits for a run's teardown) instead of cancelling it.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from testbed.cli.console import err

__all__ = ["STOP_SIGNALS", "run", "run_app"]

T = TypeVar("T")

#: What ends a command with its teardown (SIGHUP: its terminal went away).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run(main: Coroutine[Any, Any, T], *, stop: Callable[[], None] | None = None) -> T:
    """Run `main` to its end; on a stop signal, `stop()` (default: cancel `main`) and, once
    `main` has finished its teardown, SystemExit(128 + the signal's number)."""
    got: list[int] = []

    async def guarded() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_signal(signum: int) -> None:
            name = signal.Signals(signum).name
            if got:
                err.print(f"{name}: still tearing down; `kill -9` would stop the teardown itself", highlight=False)
                return
            got.append(signum)
            err.print(f"{name}: stopping; tearing down what this command started", highlight=False)
            if stop is not None:
                stop()
            else:
                task.cancel()

        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            return await main
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)

    try:
        result = asyncio.run(guarded())
    except (asyncio.CancelledError, KeyboardInterrupt):
        if got:
            raise SystemExit(128 + got[0]) from None
        raise
    if got:  # it finished on its own way out (the app exited, the run ended) after the signal
        raise SystemExit(128 + got[0])
    return result


def run_app(app: Any) -> Any:
    """Run a Textual app in this terminal; a stop signal asks it to exit (`app.exit()`:
    its ExitApp handler cancels a run and waits for its teardown)."""
    return run(app.run_async(), stop=app.exit)
