"""Agents running and online: start what is missing, wait (bounded) for each agent's retained
"online" status, and fail at once — naming the device and its log's last line — when an
agent dies before it comes online. `Liveness`: who is up by their heartbeats (the up
cell's keeper shows it in `testbed status`; a generation plans without the agents it
calls down). Which agents a cell keeps warm (`warm_set`): a generation waits only for the
agents its plan selected; the rest start when a plan asks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from testbed.composition.cells import Rig
from testbed.errors import InputError, RunFailedError
from testbed.relay.agent import SILENT_AFTER_S
from testbed.relay.messages import BadMessage, parse_status
from testbed.relay.orchestrator import RelaySettings, Timing

__all__ = ["ensure_online", "wait_online", "warm_set", "WARM_ALL_UP_TO", "MAX_SPARE_AGENTS",
           "Liveness", "down_agents"]

#: "auto": a cell of up to this many devices keeps every device's agent warm (the paper's 20);
#: a larger one (a dense cell) starts agents only for what plans select and what --warm names.
WARM_ALL_UP_TO = 32
#: a generation starts at most this many spare agents beside its chain (a recovery's pool)
MAX_SPARE_AGENTS = 16


def warm_set(spec: str, devices: list[str]) -> list[str]:
    """The agents a cell keeps warm: "auto" (every device up to WARM_ALL_UP_TO devices, else
    none), "all", "none", a number N (the first N devices) or device ids "dev01,dev02"."""
    spec = spec.strip()
    if spec == "auto":
        return list(devices) if len(devices) <= WARM_ALL_UP_TO else []
    if spec == "all":
        return list(devices)
    if spec in ("none", ""):
        return []
    if spec.isdigit():
        return list(devices[:int(spec)])
    wanted = [d.strip() for d in spec.split(",") if d.strip()]
    unknown = [d for d in wanted if d not in devices]
    if unknown:
        raise InputError(f"--warm {spec}: no device {', '.join(unknown)} in this cell; give auto, all, none, "
                         f"a number or device ids ({', '.join(devices[:3])}, ...)")
    return wanted

InServerNs = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]


async def ensure_online(rig: Rig, devices: list[str], settings: RelaySettings, in_server_ns: InServerNs) -> int:
    """Start what is missing among `devices` (not killed) and wait until each is online; how many."""
    if rig.agents is None:
        raise RunFailedError(f"run {rig.run_id}: no agents (the cell has no broker)")
    devices = [d for d in devices if rig.cell.nodes[d].state != "killed"]
    await rig.agents.ensure(devices)
    waiting = asyncio.ensure_future(in_server_ns(lambda: wait_online(settings, devices)))
    try:
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=0.5)
            if not waiting.done():
                _check_alive(rig, devices)
        waiting.result()
    finally:
        if not waiting.done():
            waiting.cancel()
            with contextlib.suppress(BaseException):
                await waiting
    return len(devices)


def _check_alive(rig: Rig, devices: list[str]) -> None:
    from testbed.emulation.procs import pid_alive

    assert rig.agents is not None
    pids = rig.agents.pids()
    logs = rig.state_dir / "logs" if rig.state_dir is not None else Path(".")
    for dev in devices:
        pid = pids.get(dev)
        if pid is not None and not pid_alive(pid):
            log = logs / f"agent-{dev}.log"
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
            raise RunFailedError(f"the agent of {dev} exited before coming online: "
                                 f"{lines[-1] if lines else 'no output'} (log: {log})")


async def wait_online(settings: RelaySettings, devices: list[str]) -> None:
    """Until every device in `devices` has said "online" (their status is retained), within
    the bound an orchestrator would use (Timing.for_compute's online timeout)."""
    import aiomqtt

    from testbed.relay import topics

    timeout_s = Timing.for_compute("profile", len(devices)).online_timeout_s
    want, seen = set(devices), set()
    async with aiomqtt.Client(settings.broker_host, settings.broker_port, username=settings.username,
                              password=settings.password, timeout=10,  # (the watch listener: several may wait)
                              identifier=f"tb-{settings.run}-wait-{secrets.token_hex(3)}") as client:
        await client.subscribe(topics.device_leaf_filter(settings.run, "status"), qos=1)
        try:
            async with asyncio.timeout(timeout_s):
                async for m in client.messages:
                    parsed = topics.parse_device_topic(settings.run, str(m.topic))
                    if parsed is None:
                        continue
                    try:
                        status = parse_status(parsed[0], bytes(m.payload))
                    except BadMessage:
                        continue  # a malformed status says nothing about being online
                    if m.retain and status.ts is not None and time.time() - status.ts > SILENT_AFTER_S:
                        continue  # the heartbeat of an agent that stopped beating: not online
                    if status.state == "online":
                        seen.add(parsed[0])
                    if want <= seen:
                        return
        except TimeoutError:
            raise RunFailedError(f"agents {sorted(want - seen)} did not come online within {timeout_s:g} s; "
                                 "see their logs (agent-<device>.log)") from None


class Liveness:
    """Each device's agent as its statuses tell it: `online` while it says so and has been
    heard within SILENT_AFTER_S (its heartbeats arrive); `down` when it fell silent or its
    will said "offline" while its process still runs (stopped, hung: it would hold a run
    up); `offline` when it never came online or its process is gone (started again when a
    run needs it)."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[str, float]] = {}  # device -> (state it said, when heard: monotonic)

    def heard(self, device: str, state: str, at: float | None = None) -> None:
        self.last[device] = (state, time.monotonic() if at is None else at)

    def state(self, device: str, process_alive: bool, now: float | None = None) -> str:
        said, at = self.last.get(device, ("", 0.0))
        now = time.monotonic() if now is None else now
        if said in ("online", "computing") and now - at <= SILENT_AFTER_S:
            return "online"
        return "down" if said and process_alive else "offline"

    def silent_s(self, device: str, now: float | None = None) -> float | None:
        """Seconds since the device was last heard (None: never)."""
        if device not in self.last:
            return None
        return (time.monotonic() if now is None else now) - self.last[device][1]


def down_agents(state_dir: Path | None) -> set[str]:
    """The devices whose agents the cell's keeper calls `down` (state.json's nodes: `agent`),
    empty where no keeper follows them (a cold run's cell, a deployment)."""
    if state_dir is None:
        return set()
    try:
        doc = json.loads((Path(state_dir) / "state.json").read_text())
        return {n["id"] for n in doc.get("nodes", []) if n.get("agent") == "down"}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return set()
