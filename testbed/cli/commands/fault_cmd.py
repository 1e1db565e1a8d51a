"""`testbed fault KIND [DEVICE] --run ID`: inject a fault into a cell that `testbed up` keeps alive.

The cell is driven through its supervisor (`AttachedCell`: the control socket), the same
`FaultInjector` as during `testbed run`, so it works on netns and docker cells alike. A
fault with a duration holds this command until it is undone (Ctrl-C undoes it at once);
without one (rate-drop, slow) the change stays until the next fault, a mobility tick
(rates) or `testbed down`. A killed device stays down: `testbed status` shows it `killed`
and runs on the cell leave it out. During `testbed run`, use the topology's `faults:`
list or `--fail DEV` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import typer

from testbed.cli.console import err, out, print_json
from testbed.cli.views import link_sentence
from testbed.errors import ResourceError, TopologyError


#: Faults that change a link's delay or loss: the command prints the link afterwards.
LINK_KINDS = ("delay", "loss")


def fault(
    kind: str = typer.Argument(..., help="kill, broker-restart, link-flap, rate-drop, slow, delay or loss"),
    device: str | None = typer.Argument(None, help="device id (not for broker-restart)"),
    run: str | None = typer.Option(None, "--run", help="run id (default: the only run that is up)"),
    duration_s: float | None = typer.Option(None, "--duration", help="seconds until the fault is undone "
                                            "(default: broker-restart 1, link-flap 3; rate-drop/slow/delay/loss: stays)"),
    value: float | None = typer.Option(None, "--value", help="rate-drop: Mbit/s (default 0.01); slow: CPU cores "
                                       "(default 0.05); delay: one-way ms (default 50); loss: % (default 5)"),
    as_json: bool = typer.Option(False, "--json", help="print only a JSON document on stdout"),
) -> None:
    """Inject one fault into a running `testbed up` cell (see docs/reliability.md)."""
    from testbed.cli.commands.emulation_cmds import require_root
    from testbed.composition.faults import FaultInjector, parse_fault
    from testbed.emulation.attached import AttachedCell
    from testbed.emulation.runs import resolve_run

    spec = parse_fault(kind, device, duration_s=duration_s, value=value)
    if kind != "broker-restart" and device is None:
        raise TopologyError(f"testbed fault {kind}: name the device (nothing is computing in a `testbed up` cell)")
    require_root()
    run_id = resolve_run(run)
    events: list[dict[str, Any]] = []
    cell: AttachedCell | None = None

    def emit(etype: str, dev: str | None, **data: Any) -> None:
        events.append({"type": etype, "device": dev, **data})
        if not as_json:
            extra = ", ".join(f"{k} {v}" for k, v in data.items() if v is not None and k != "kind")
            out.print(f"{etype.replace('_', ' ')}: {data.get('kind', '')} {dev or ''} {extra}".strip(),
                      highlight=False)

    async def show_link() -> None:
        """The device's link as the cell applies it now (delay and loss, both directions)."""
        assert cell is not None and device is not None
        status = await asyncio.to_thread(cell.status)  # also refreshes cell.impairments
        imp = cell.impairments.get(device)
        out.print(link_sentence(device, None if imp is None else imp.to_json(),
                                (status.get("impairments") or {}).get("path")), highlight=False)

    async def go() -> dict[str, Any]:
        nonlocal cell
        cell = await AttachedCell.connect(run_id)
        inj = FaultInjector(cell, emit)
        rec = await inj.inject(spec)
        if not as_json and kind in LINK_KINDS:
            await show_link()
        try:
            await inj.wait_restored()  # the undo after duration_s
        except asyncio.CancelledError:  # Ctrl-C: undo now
            with contextlib.suppress(Exception):
                await inj.close()
            raise
        if inj.errors:  # e.g. the broker did not come back: a failed fault, exit 4
            raise ResourceError(f"testbed fault {kind}: {'; '.join(inj.errors)}; `testbed status --run {run_id}` "
                                "shows the cell as it is now")
        if not as_json and kind in LINK_KINDS and rec.restored_t_s is not None:
            await show_link()  # back to what it was
        return rec.to_json()

    try:
        doc = asyncio.run(go())
    except KeyboardInterrupt:
        err.print("interrupted: fault undone")
        raise
    if as_json:
        print_json({"run": run_id, "fault": doc, "events": events})


def register(app: typer.Typer) -> None:
    app.command()(fault)
