"""`testbed fault KIND [DEVICE] --run ID`: inject a fault into a cell that `testbed up` keeps alive.

The run's kernel objects are found from its state (/run/testbed/<run>/state.json) and its
names (testbed/emulation naming), and changed through the emulation's own functions: the
device's link (down, then up), its HTB classes (rate), its cgroup (CPU quota), the
processes in its namespace and cgroup (kill), the broker (stop, start again with the same
config). A fault with a duration holds this command until it is undone (Ctrl-C undoes it
at once); without one (rate-drop, slow) the change stays until the next fault, a mobility
tick (rates) or `testbed down`. During `testbed run`, use the topology's `faults:` list or
`--fail DEV` instead (testbed/composition/faults.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import typer

from testbed.cli.console import err, out, print_json
from testbed.errors import ResourceError, RunFailedError, TopologyError


class _UpRun:
    """The part of an `Emulation` that FaultInjector uses, rebuilt from a running `up`."""

    def __init__(self, run_id: str, state: dict[str, Any]):
        from testbed.emulation.backend import NetnsBackend, NodeSpec
        from testbed.emulation.cgroups import detect_cgroups

        if state.get("backend") != "netns":
            raise ResourceError(f"testbed fault: run {run_id} uses the {state.get('backend')} backend; "
                                "only netns runs take faults from the command line for now")
        self.run_id, self.state = run_id, state
        self.nodes = {n["id"]: _Node(n) for n in state["nodes"]}
        devices = [n for n in state["nodes"] if n["role"] == "device"]
        self._backend = NetnsBackend(run_id)
        self._backend._nodes = {n["id"]: NodeSpec(n["id"], "device", n["address"], i) for i, n in enumerate(devices)}
        try:
            self.cg = detect_cgroups()
        except ResourceError:
            self.cg = None
        self.broker = _broker_handle(run_id, state)

    def device_ids(self) -> list[str]:
        return [i for i, n in self.nodes.items() if n.role == "device"]

    async def cut_link(self, dev: str) -> None:
        await self._backend.set_link_state(dev, False)

    async def restore_link(self, dev: str) -> None:
        await self._backend.set_link_state(dev, True)

    async def set_link(self, dev: str, up_mbps: float, down_mbps: float) -> None:
        from testbed.emulation.nsutil import open_iproute
        from testbed.emulation.shaping import LinkRate, change_rates, plan_cell, plan_rates

        if any(n.rate_up_mbps is None for n in self.nodes.values() if n.role == "device"):
            raise ResourceError(f"run {self.run_id}: shaping is off; no rate to change")
        links = [LinkRate(i, n.address, n.rate_up_mbps, n.rate_down_mbps) for i, n in self.nodes.items()
                 if n.role == "device"]
        cell = self.state.get("cell") or {}
        caps = (cell.get("capacity_up_mbps"), cell.get("capacity_down_mbps")) if cell.get("shared_capacity") else (None, None)
        ns, down_if, up_if = self._backend.shaping_target()
        classes = plan_cell(down_if, up_if, links, *caps).classes
        self.nodes[dev].rate_up_mbps, self.nodes[dev].rate_down_mbps = up_mbps, down_mbps
        new = [LinkRate(i, n.address, n.rate_up_mbps, n.rate_down_mbps) for i, n in self.nodes.items()
               if n.role == "device"]
        async with open_iproute(ns) as ipr:
            await change_rates(ipr, plan_rates(down_if, up_if, new, classes, *caps))

    async def kill(self, dev: str) -> None:
        from testbed.emulation.procs import stop_pid
        from testbed.emulation.runs import _pids_in_netns

        pids = set(self.cg.pids(self.run_id, dev)) if self.cg is not None else set()
        pids |= _pids_in_netns([Path(self.nodes[dev].netns)])
        for pid in sorted(pids):
            await stop_pid(pid, timeout_s=2.0)

    async def start_broker(self, **kwargs: Any) -> Any:
        from testbed.emulation.broker import start_broker
        from testbed.emulation.runs import run_dir, write_state

        srv = self.nodes["server"]
        procs = tuple(self.cg.procs_files(self.run_id, "server")) if self.cg is not None else ()
        self.broker = await start_broker(srv.netns, srv.address, run_dir(self.run_id) / "broker", cgroup_procs=procs,
                                         **kwargs)
        b = self.state["broker"] = {"kind": self.broker.kind, "pid": self.broker.pid, "host": self.broker.host,
                                    "port": self.broker.port}
        write_state(self.run_id, self.state)
        return b


class _Node:
    def __init__(self, n: dict[str, Any]):
        self.id, self.role, self.netns, self.address = n["id"], n["role"], n["netns"], n["address"]
        self.rate_up_mbps, self.rate_down_mbps = n.get("rate_up_mbps"), n.get("rate_down_mbps")
        self.cpu_quota_cores, self.memory_mb = n.get("cpu_quota_cores"), n.get("memory_mb")


def _broker_handle(run_id: str, state: dict[str, Any]) -> Any:
    from testbed.emulation.broker import BrokerHandle
    from testbed.emulation.runs import run_dir

    b = state.get("broker")
    if not b:
        return None
    d = run_dir(run_id) / "broker"
    conf = d / ("mosquitto.conf" if b["kind"] == "mosquitto" else "amqtt.yaml")
    return BrokerHandle(b["kind"], b["pid"], b["host"], b["port"], conf, d / f"{b['kind']}.log")


class _Target:
    """What FaultInjector drives: `emu` and the event sink (printed)."""

    def __init__(self, emu: _UpRun, as_json: bool):
        self.emu, self.run_id, self.as_json = emu, emu.run_id, as_json
        self.broker = emu.broker
        self.events: list[dict[str, Any]] = []

    def _event_local(self, etype: str, device: str | None, **data: Any) -> None:
        self.events.append({"type": etype, "device": device, **data})
        if not self.as_json:
            extra = ", ".join(f"{k} {v}" for k, v in data.items() if v is not None and k != "kind")
            out.print(f"{etype.replace('_', ' ')}: {data.get('kind', '')} {device or ''} {extra}".strip(),
                      highlight=False)


def fault(
    kind: str = typer.Argument(..., help="kill, broker-restart, link-flap, rate-drop, slow, delay or loss"),
    device: str | None = typer.Argument(None, help="device id (not for broker-restart)"),
    run: str | None = typer.Option(None, "--run", help="run id (default: the only run that is up)"),
    duration_s: float | None = typer.Option(None, "--duration", help="seconds until the fault is undone "
                                            "(default: broker-restart 1, link-flap 3; rate-drop/slow: stays)"),
    value: float | None = typer.Option(None, "--value", help="rate-drop: Mbit/s (default 0.01); slow: CPU cores "
                                       "(default 0.05)"),
    as_json: bool = typer.Option(False, "--json", help="print only a JSON document on stdout"),
) -> None:
    """Inject one fault into a running `testbed up` cell (see README, Reliability and security)."""
    from testbed.emulation.runs import read_state, resolve_run, supervisor_pid
    from testbed.composition.faults import FaultInjector, parse_fault

    spec = parse_fault(kind, device, duration_s=duration_s, value=value)
    if kind != "broker-restart" and device is None:
        raise TopologyError(f"testbed fault {kind}: name the device (nothing is computing in a `testbed up` cell)")
    from testbed.cli.commands.emulation_cmds import _require_root

    _require_root()
    run_id = resolve_run(run)
    state = read_state(run_id)
    if state is None or supervisor_pid(run_id) is None:
        raise RunFailedError(f"run {run_id} is not up (no state or no supervisor); start one with `testbed up FILE`")
    target = _Target(_UpRun(run_id, state), as_json)

    async def go() -> dict[str, Any]:
        inj = FaultInjector(target)
        rec = await inj.inject(spec)
        try:
            while any(not t.done() for t in inj._tasks):  # the undo after duration_s
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:  # Ctrl-C: undo now
            with contextlib.suppress(Exception):
                await inj.close()
            raise
        return rec.to_json()

    try:
        doc = asyncio.run(go())
    except KeyboardInterrupt:
        err.print("interrupted: fault undone")
        raise
    if as_json:
        print_json({"run": run_id, "fault": doc, "events": target.events})


def register(app: typer.Typer) -> None:
    app.command()(fault)
