"""Fault injection into a live run: kill, broker-restart, link-flap, rate-drop, slow.

Composition layer (like runner.py): it drives a running `Runner`'s emulation — processes,
links, cgroups, the broker — through the Emulation's API, and reports every fault as a
`fault_injected` / `fault_restored` telemetry event. Used by scenario files (the
topology's `faults:` list, scheduled by `FaultInjector.feed` from the run's events), the
CLI (`testbed run --fail DEV`), the TUI and bench/faults.py (`FaultInjector.inject`).

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
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.errors import ResourceError, TopologyError
from testbed.model.topology import FaultSpec

__all__ = [
    "revive_agent",
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
    _undo: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)

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
    """Faults on one running `Runner` (anything with `emu`, `broker`, `kill(dev)` and
    `_event_local(type, device, **data)`).

    `feed(event)` schedules the `specs` from the run's telemetry (the runner calls it for
    every event); `inject(spec)` applies one fault now; `close()` cancels what is pending
    and undoes the faults that are still active (links up, rates and quotas back, broker up).
    """

    def __init__(self, runner: Any, specs: list[FaultSpec] | tuple[FaultSpec, ...] = ()):
        self.runner = runner
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
        costs = getattr(self.runner, "_costs", None) or {}
        c = costs.get(device)
        return float(getattr(c, "t_cmp_s", 0.0) or 0.0)

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
            self._event("fault_failed", spec.device or device, kind=spec.kind, error=str(e))

    # -- applying ------------------------------------------------------------------------
    def now_s(self) -> float:
        return 0.0 if self._t0 is None else time.monotonic() - self._t0

    def _event(self, etype: str, device: str | None, **data: Any) -> None:
        emit = getattr(self.runner, "_event_local", None)
        if emit is not None:
            emit(etype, device, **data)

    async def inject(self, spec: FaultSpec | str, device: str | None = None, *, duration_s: float | None = None,
                     value: float | None = None) -> Injected:
        """Apply one fault now. Temporary faults (a duration) undo themselves after it."""
        if isinstance(spec, str):
            spec = parse_fault(spec, device, duration_s=duration_s, value=value)
        kind = spec.kind
        emu = getattr(self.runner, "emu", None)
        if emu is None:
            raise ResourceError(f"fault {kind}: no emulation is up")
        dev = spec.device or device
        if kind in _DEVICE_KINDS:
            if dev is None:
                now = self._current or self._last
                dev = now[0] if now else None
            if dev is None:
                raise TopologyError(f"fault {kind}: no device given and none is computing now; name one")
            if dev not in emu.device_ids():
                raise TopologyError(f"fault {kind}: unknown device {dev!r}; devices: {', '.join(emu.device_ids())}")
        else:
            dev = None
        dur = spec.duration_s if spec.duration_s is not None else DEFAULT_DURATION_S[kind]
        val = spec.value if spec.value is not None else DEFAULT_VALUE.get(kind)
        stage = self._current[1] if self._current and self._current[0] == dev else None
        rec = Injected(kind, dev, self.now_s(), stage, {"duration_s": dur} | ({"value": val} if val is not None else {}))
        if kind == "kill":
            await self._kill(dev)  # the runner emits fault_injected itself
        else:
            self._event("fault_injected", dev, kind=kind, duration_s=dur, value=val)
            rec._undo = await getattr(self, "_" + kind.replace("-", "_"))(emu, dev, val)
        self.injected.append(rec)
        if rec._undo is not None and dur is not None:
            self._spawn(self._restore_after(rec, dur))
        return rec

    async def _restore_after(self, rec: Injected, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        await self.restore(rec)

    async def restore(self, rec: Injected) -> None:
        undo, rec._undo = rec._undo, None
        if undo is None:
            return
        await undo()
        rec.restored_t_s = self.now_s()
        self._event("fault_restored", rec.device, kind=rec.kind, after_s=rec.restored_t_s - rec.t_s)

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

    # -- the faults ----------------------------------------------------------------------
    async def _kill(self, dev: str) -> None:
        kill = getattr(self.runner, "kill", None)
        if kill is not None:
            await kill(dev)
        else:
            self._event("fault_injected", dev, kind="kill")
            await self.runner.emu.kill(dev)

    async def _link_flap(self, emu: Any, dev: str, _val: float | None) -> Callable[[], Awaitable[None]]:
        await emu.cut_link(dev)
        return lambda: emu.restore_link(dev)

    async def _rate_drop(self, emu: Any, dev: str, val: float) -> Callable[[], Awaitable[None]]:
        node = emu.nodes[dev]
        old = (node.rate_up_mbps, node.rate_down_mbps)
        if old[0] is None or old[1] is None:
            raise ResourceError(f"rate-drop {dev}: shaping is off in this emulation")
        await emu.set_link(dev, val, val)
        return lambda: emu.set_link(dev, *old)

    async def _delay(self, emu: Any, dev: str, val: float) -> Callable[[], Awaitable[None]]:
        return await self._impair(emu, dev, delay_ms=val)

    async def _loss(self, emu: Any, dev: str, val: float) -> Callable[[], Awaitable[None]]:
        return await self._impair(emu, dev, loss_pct=val)

    async def _impair(self, emu: Any, dev: str, **change: float) -> Callable[[], Awaitable[None]]:
        from dataclasses import replace

        from testbed.model.impairments import LinkImpairment

        if not hasattr(emu, "set_impairments"):
            raise ResourceError(f"{next(iter(change))} {dev}: this cell cannot change link impairments from here "
                                "(a `testbed up` cell takes them through its owner)")
        old = emu.impairments[dev]
        jitter = min(old.up.jitter_ms, change.get("delay_ms", old.up.delay_ms))  # jitter never exceeds the delay
        new = LinkImpairment(replace(old.up, jitter_ms=jitter, **change), replace(old.down, jitter_ms=jitter, **change))
        await emu.set_impairments({dev: new})
        return lambda: emu.set_impairments({dev: old})

    async def _slow(self, emu: Any, dev: str, val: float) -> Callable[[], Awaitable[None]]:
        from testbed.emulation.cgroups import CgroupLimits

        cg = getattr(emu, "cg", None)
        node = emu.nodes[dev]
        if cg is None and hasattr(emu.backend, "set_cpu"):  # docker: `docker update --cpus`
            old_cores = node.cpu_quota_cores
            await emu.backend.set_cpu(dev, val)
            node.cpu_quota_cores = val

            async def undo_cpu() -> None:
                if old_cores is not None:
                    await emu.backend.set_cpu(dev, old_cores)
                node.cpu_quota_cores = old_cores

            return undo_cpu
        if cg is None:
            raise ResourceError(f"slow {dev}: this backend has no cgroups the testbed manages (use --backend netns)")
        old = CgroupLimits(node.cpu_quota_cores, node.memory_mb)
        await asyncio.to_thread(cg.set_limits, emu.run_id, dev, CgroupLimits(val, node.memory_mb))
        node.cpu_quota_cores = val

        async def undo() -> None:
            await asyncio.to_thread(cg.set_limits, emu.run_id, dev, old)
            node.cpu_quota_cores = old.cpu_cores

        return undo

    async def _broker_restart(self, emu: Any, _dev: None, _val: None) -> Callable[[], Awaitable[None]]:
        old = emu.broker
        if old is None:
            raise ResourceError("broker-restart: this run has no broker")
        kwargs = broker_start_args(old)
        await old.stop()
        emu.broker = None

        async def start() -> None:
            starter = getattr(self.runner, "_start_broker", None)  # the runner's (keeps mosquitto as root)
            if starter is not None and "password_file" in kwargs:
                new = await starter(kwargs["password_file"], kwargs.get("acl_file"), kwargs.get("max_message_bytes"))
            else:
                new = await emu.start_broker(**kwargs)
            if getattr(self.runner, "broker", None) is old:
                self.runner.broker = new

        return start


def broker_start_args(handle: Any) -> dict[str, Any]:
    """The `Emulation.start_broker` arguments that made `handle`, read back from its
    config file (so a restart enforces the same credentials, ACL and size limit)."""
    args: dict[str, Any] = {"prefer": handle.kind}
    conf = Path(handle.config_path)
    if handle.kind == "mosquitto":
        for line in conf.read_text().splitlines():
            key, _, rest = line.strip().partition(" ")
            if key == "password_file":
                args["password_file"] = Path(rest)
            elif key == "acl_file":
                args["acl_file"] = Path(rest)
            elif key == "message_size_limit":
                args["max_message_bytes"] = int(rest)
        for key in ("password_file", "acl_file"):  # the broker's own copies are rewritten at start: snapshot them
            src = args.get(key)
            if src is not None and src.parent == conf.parent:
                dst = src.with_name(src.name + ".restart")
                fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(src.read_bytes())
                args[key] = dst
    else:
        import yaml

        plugins = (yaml.safe_load(conf.read_text()) or {}).get("plugins", {})
        auth = plugins.get("amqtt.plugins.authentication.FileAuthPlugin")
        if auth:
            args["password_file"] = Path(auth["password_file"])
            acl = Path(auth["password_file"]).with_name("mosquitto.acl")  # security.write_security_files
            if "amqtt.plugins.topic_checking.TopicAccessControlListPlugin" in plugins and acl.exists():
                args["acl_file"] = acl
    return args


async def revive_agent(runner: Any, device: str) -> int:
    """Start a killed device's agent again (same config and credentials) in its node;
    returns its pid. For the TUI and bench/faults.py (a new generation after a kill)."""
    emu, state = runner.emu, getattr(runner, "_state_dir", None)
    if emu is None or state is None:
        raise ResourceError(f"revive {device}: no run is up")
    if device not in emu.device_ids():
        raise TopologyError(f"revive: unknown device {device!r}; devices: {', '.join(emu.device_ids())}")
    await emu.kill(device)  # whatever is left of the old one
    cfg = state / "agents" / f"{device}.json"
    node = emu.nodes[device]
    cores = node.cpu_quota_cores or 1.0
    env = {"TESTBED_AGENT_CONFIG": str(cfg), "OMP_NUM_THREADS": str(max(1, int(cores)))}
    args = [runner.run_id, device, "--config", str(cfg)]
    logs = (runner.out_dir / "logs") if getattr(runner, "out_dir", None) is not None else state / "logs"
    log = logs / f"agent-{device}.log"
    pool = getattr(runner, "_pool", None)
    if pool is not None:
        procs = list(emu.cg.procs_files(runner.run_id, device)) if emu.cg is not None else []
        pid = await pool.spawn(node.netns, procs, ["testbed-agent", *args], env, log)
    else:
        import sys

        pid = await emu.spawn(device, [sys.executable, "-m", "testbed.relay.agent", *args], env, log)
    pids = getattr(runner, "_pids", None)
    if isinstance(pids, dict):
        pids[device] = pid
    return pid
