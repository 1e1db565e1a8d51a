"""The per-run supervisor: a detached process that owns one `Emulation` until told to stop.

`testbed up` starts `python -m testbed.composition.supervisor RUN FILE [--seed N]` in its
own session; the supervisor writes supervisor.pid, then state.json (ready) or error.json,
and tears everything down on SIGTERM/SIGINT (what `testbed down` sends) or on a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
import traceback

from testbed.emulation.emulation import Emulation
from testbed.emulation.runs import run_dir, write_state, write_topology
from testbed.errors import TestbedError
from testbed.model.topology import load_topology


async def _main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    topo = load_topology(args.file, seed=args.seed)
    t0 = time.perf_counter()
    write_topology(args.run, topo)
    async with Emulation(topo, args.run, backend=args.backend, state_dir=run_dir(args.run)) as emu:
        if args.broker:
            await emu.start_broker()
        doc = emu.status() | {
            "ready": True,
            "topology": os.path.abspath(args.file),
            "seed": topo.seed,
            "supervisor_pid": os.getpid(),
            "up_s": round(time.perf_counter() - t0, 3),
            "timings_s": {k: round(v, 4) for k, v in emu.timings_s.items()},
        }
        write_state(args.run, doc)

        def refresh(_update) -> None:  # mobility: keep status current (at most once a second)
            now = time.monotonic()
            if now - refresh.last >= 1.0:  # type: ignore[attr-defined]
                refresh.last = now  # type: ignore[attr-defined]
                write_state(args.run, doc | emu.status())

        refresh.last = 0.0  # type: ignore[attr-defined]
        emu.on_update(refresh)
        await stop.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="testbed-supervisor")
    ap.add_argument("run")
    ap.add_argument("file")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--backend", default="netns")
    ap.add_argument("--no-broker", dest="broker", action="store_false")
    args = ap.parse_args(argv)
    (run_dir(args.run) / "supervisor.pid").write_text(str(os.getpid()))
    try:
        return asyncio.run(_main(args))
    except TestbedError as e:
        write_state(args.run, {"error": str(e), "exit_code": e.exit_code}, "error.json")
        return e.exit_code
    except BaseException as e:  # noqa: BLE001 - a crash is reported to `up`, never silent
        write_state(args.run, {"error": f"{type(e).__name__}: {e}", "exit_code": 5,
                               "traceback": traceback.format_exc()}, "error.json")
        return 5


if __name__ == "__main__":
    sys.exit(main())
