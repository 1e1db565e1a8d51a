"""Fault injection into a live run: kill, broker-restart, link-flap, rate-drop, slow.

`FaultInjector(cell, emit, costs)` drives any `Cell` (emulation/cell.py) — a cell this
process made, or a `testbed up` cell through its supervisor — and reports every fault
through `emit` as `fault_injected` / `fault_restored` events. Used by the run owner (the
topology's `faults:` list and `testbed run --fail DEV`, scheduled by `feed` from the run's
events), `testbed fault`, the TUI and bench/faults.py (`inject`).

    kill            end the device's agent (SIGTERM, then SIGKILL); its MQTT last will
                    tells the orchestrator, which recovers from the checkpoint
    broker-restart  stop the broker, start it again after duration_s (default 1 s);
                    agents and orchestrator reconnect with backoff and resume
    link-flap       take the device's link down for duration_s (default 3 s), then up
    rate-drop       set the device's up/down rate to `value` Mbit/s (default 0.01) for
                    duration_s (default: the rest of the run)
    slow            lower the device's CPU quota to `value` cores (default 0.05) for
                    duration_s (default: the rest of the run)
    delay, loss     set the device's one-way delay to `value` ms (default 50) / its loss
                    to `value` % (default 5), both directions, for duration_s (default:
                    the rest of the run); the other impairments stay (docs/links.md)

When: `at_s` seconds after the relay starts, or `at_stage` N — in the middle of stage N's
computation (half its predicted compute time after the device received the latent).
Neither: stage 0. Device omitted: the device computing at that moment.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from testbed.emulation.cell import Cell
from testbed.errors import ResourceError, TopologyError
from testbed.model.topology import FaultSpec

__all__ = [
    "FAULT_KINDS",
    "DEFAULT_DURATION_S",
    "DEFAULT_VALUE",
    "Injected",
    "FaultInjector",
    "parse_fault",
]

FAULT_KINDS = ("kill", "broker-restart", "link-flap", "rate-drop", "slow", "delay", "loss")
#: None: the fault lasts until the run ends (the emulation is torn down or `close()` restores it)
DEFAULT_DURATION_S: dict[str, float | None] = {"kill": None, "broker-restart": 1.0, "link-flap": 3.0,
                                               "rate-drop": None, "slow": None, "delay": None, "loss": None}
DEFAULT_VALUE: dict[str, float | None] = {"rate-drop": 0.01, "slow": 0.05, "delay": 50.0, "loss": 5.0}
_DEVICE_KINDS = ("kill", "link-flap", "rate-drop", "slow", "delay", "loss")


@dataclass
class Injected:
    """One fault as it happened: when (s after the relay started), on what, and its undo."""

    kind: str
    device: str | None
    t_s: float
    stage: int | None
    detail: dict[str, Any] = field(default_factory=dict)
    restored_t_s: float | None = None
    undo: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "device": self.device, "t_s": self.t_s, "stage": self.stage,
                "restored_t_s": self.restored_t_s, **self.detail}


def parse_fault(kind: str, device: str | None = None, *, at_s: float | None = None, at_stage: int | None = None,
                duration_s: float | None = None, value: float | None = None) -> FaultSpec:
    """A FaultSpec from CLI/TUI arguments; bad ones are TopologyError (exit 2) naming the fix."""
    from pydantic import ValidationError

    try:
        return FaultSpec(kind=kind, device=device, at_s=at_s, at_stage=at_stage, duration_s=duration_s, value=value)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'fault'}: {x['msg'].removeprefix('Value error, ')}"
                         for x in e.errors())
        raise TopologyError(f"fault {kind!r}: {msgs} (kinds: {', '.join(FAULT_KINDS)})") from None


class FaultInjector:
    """Faults on one cell, reported through `emit(type, device, **data)`.

    `feed(event)` schedules the `specs` from the run's telemetry (the run owner calls it
    for every event); `inject(spec)` applies one fault now; `close()` cancels what is
    pending and undoes the faults that are still active (links up, rates and quotas back,
    broker up). `costs` (device -> DeviceCost) place `at_stage` faults mid-computation.
    """

    def __init__(self, cell: Cell, emit: Callable[..., Any], costs: dict[str, Any] | None = None,
                 specs: list[FaultSpec] | tuple[FaultSpec, ...] = ()):
        self.cell = cell
        self.emit = emit
        self.costs = dict(costs or {})
        self.specs = list(specs)
        self.injected: list[Injected] = []
        self.errors: list[str] = []
        self._t0: float | None = None
        self._fired: set[int] = set()
        self._tasks: set[asyncio.Task] = set()
        self._current: tuple[str, int] | None = None  # (device, stage) in flight now
        self._last: tuple[str, int] | None = None  # the last stage started (between stages)

    # -- scheduling from telemetry -------------------------------------------------------
    def feed(self, ev: dict[str, Any]) -> None:
        t = ev.get("type")
        if t == "run_started":
            self._t0 = time.monotonic()
            self._fired.clear()
            for n, spec in enumerate(self.specs):
                if spec.at_s is not None:
                    self._fired.add(n)
                    self._spawn(self._after(spec.at_s, spec, None))
        elif t in ("stage_started", "downloaded") and ev.get("device") is not None:
            self._current = self._last = (ev["device"], ev.get("stage"))
            if t != "downloaded":
                return
            for n, spec in enumerate(self.specs):
                stage = spec.at_stage if spec.at_stage is not None else (0 if spec.at_s is None else None)
                if n in self._fired or stage is None or ev.get("stage") != stage:
                    continue
                self._fired.add(n)
                self._spawn(self._after(0.5 * self._predicted_cmp_s(ev["device"]), spec, ev["device"]))
        elif t in ("uploaded", "relay_finished"):
            self._current = None

    def _predicted_cmp_s(self, device: str) -> float:
        c = self.costs.get(device)
        return float(c.t_cmp_s) if c is not None else 0.0

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after(self, delay_s: float, spec: FaultSpec, device: str | None) -> None:
        if self._t0 is not None and spec.at_s is not None:
            delay_s = max(0.0, self._t0 + spec.at_s - time.monotonic())
        await asyncio.sleep(delay_s)
        try:
            await self.inject(spec, device=spec.device or device)
        except Exception as e:  # noqa: BLE001 - a failed injection is reported, the run goes on
            self.errors.append(f"{spec.kind}: {e}")
            self.emit("fault_failed", spec.device or device, kind=spec.kind, error=str(e))

    # -- applying ------------------------------------------------------------------------
    def now_s(self) -> float:
        return 0.0 if self._t0 is None else time.monotonic() - self._t0

    async def inject(self, spec: FaultSpec | str, device: str | None = None, *, duration_s: float | None = None,
                     value: float | None = None) -> Injected:
        """Apply one fault now. Temporary faults (a duration) undo themselves after it."""
        if isinstance(spec, str):
            spec = parse_fault(spec, device, duration_s=duration_s, value=value)
        kind = spec.kind
        cell = self.cell
        dev = spec.device or device
        if kind in _DEVICE_KINDS:
            if dev is None:
                now = self._current or self._last
                dev = now[0] if now else None
            if dev is None:
                raise TopologyError(f"fault {kind}: no device given and none is computing now; name one")
            if dev not in cell.device_ids():
                raise TopologyError(f"fault {kind}: unknown device {dev!r}; devices: {', '.join(cell.device_ids())}")
        else:
            dev = None
        dur = spec.duration_s if spec.duration_s is not None else DEFAULT_DURATION_S[kind]
        val = spec.value if spec.value is not None else DEFAULT_VALUE.get(kind)
        stage = self._current[1] if self._current and self._current[0] == dev else None
        rec = Injected(kind, dev, self.now_s(), stage, {"duration_s": dur} | ({"value": val} if val is not None else {}))
        self.emit("fault_injected", dev, kind=kind, duration_s=dur, value=val)
        rec.undo = await self._APPLY[kind](self, cell, dev, val)
        self.injected.append(rec)
        if rec.undo is not None and dur is not None:
            self._spawn(self._restore_after(rec, dur))
        return rec

    async def _restore_after(self, rec: Injected, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        try:
            await self.restore(rec)
        except Exception as e:  # noqa: BLE001 - a failed undo is a failed fault: in `errors`, and an event
            self.errors.append(f"restore {rec.kind}{f' {rec.device}' if rec.device else ''}: {e}")
            self.emit("fault_failed", rec.device, kind=rec.kind, error=str(e))

    async def restore(self, rec: Injected) -> None:
        undo, rec.undo = rec.undo, None
        if undo is None:
            return
        await undo()
        rec.restored_t_s = self.now_s()
        self.emit("fault_restored", rec.device, kind=rec.kind, after_s=rec.restored_t_s - rec.t_s)

    async def wait_restored(self) -> None:
        """Until every scheduled undo has run."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Cancel pending faults and undo the active ones (bounded: each undo has 30 s)."""
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for rec in self.injected:
            try:
                async with asyncio.timeout(30):
                    await self.restore(rec)
            except Exception as e:  # noqa: BLE001 - collected; teardown removes the rest anyway
                self.errors.append(f"restore {rec.kind} {rec.device}: {e}")

    # -- the faults: each applies itself and returns its undo (None: it stays) -----------
    async def _kill(self, cell: Cell, dev: str, _val: float | None) -> None:
        await cell.kill(dev)  # its agent's MQTT last will tells the orchestrator
        return None

    async def _link_flap(self, cell: Cell, dev: str, _val: float | None) -> Callable[[], Awaitable[None]]:
        await cell.cut_link(dev)
        return lambda: cell.restore_link(dev)

    async def _rate_drop(self, cell: Cell, dev: str, val: float) -> Callable[[], Awaitable[None]]:
        node = cell.nodes[dev]
        old = (node.rate_up_mbps, node.rate_down_mbps)
        if old[0] is None or old[1] is None:
            raise ResourceError(f"rate-drop {dev}: shaping is off in this cell")
        await cell.set_link(dev, val, val)
        return lambda: cell.set_link(dev, *old)

    async def _delay(self, cell: Cell, dev: str, val: float) -> Callable[[], Awaitable[None]]:
        return await self._impair(cell, dev, delay_ms=val)

    async def _loss(self, cell: Cell, dev: str, val: float) -> Callable[[], Awaitable[None]]:
        return await self._impair(cell, dev, loss_pct=val)

    async def _impair(self, cell: Cell, dev: str, **change: float) -> Callable[[], Awaitable[None]]:
        from dataclasses import replace

        from testbed.model.impairments import LinkImpairment

        old = cell.impairments[dev]
        jitter = min(old.up.jitter_ms, change.get("delay_ms", old.up.delay_ms))  # jitter never exceeds the delay
        new = LinkImpairment(replace(old.up, jitter_ms=jitter, **change), replace(old.down, jitter_ms=jitter, **change))
        await cell.set_impairments({dev: new})
        return lambda: cell.set_impairments({dev: old})

    async def _slow(self, cell: Cell, dev: str, val: float) -> Callable[[], Awaitable[None]]:
        old = cell.nodes[dev].cpu_quota_cores
        if old is None:
            raise ResourceError(f"slow {dev}: the cell runs without CPU limits")
        await cell.set_cpu(dev, val)
        return lambda: cell.set_cpu(dev, old)

    async def _broker_restart(self, cell: Cell, _dev: None, _val: None) -> Callable[[], Awaitable[None]]:
        old = cell.broker
        if old is None:
            raise ResourceError("broker-restart: this cell has no broker")
        await cell.stop_broker()

        async def start() -> None:
            await cell.start_broker(old.settings)  # the same config, credentials and ACL

        return start

    _APPLY = {"kill": _kill, "link-flap": _link_flap, "rate-drop": _rate_drop, "slow": _slow, "delay": _delay,
              "loss": _loss, "broker-restart": _broker_restart}
