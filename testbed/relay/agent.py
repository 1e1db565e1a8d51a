"""The device agent: one process per device that serves every collaboration method's tasks.

Started inside the device's node (namespace or container, under its cgroup). It loads its
local model variant, connects to the broker with its own credentials (last will: retained
"offline" on its status topic), publishes "online" — again every HEARTBEAT_S, so that a
hung agent is told from a live one — and serves its task topic: each task's
`meta.method` picks the method's handler (methods/<name>/agent.py, named by the method
registry and handed in by whoever starts the agent: methods/device.py), made on the
method's first task. A handler decodes and validates its tasks (wire.py), computes, pads
to the profile's time in `compute: profile` mode (recording any overrun: a slower real
computation is never reported as the profile time) and uploads its result. Bad payloads
are logged and dropped; the agent keeps serving and reconnects with backoff when the
broker goes away.

Configuration: a JSON file (0600, written by the runner) named by `--config`, the
TESTBED_AGENT_CONFIG variable, or /run/testbed/<run>/agents/<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from testbed.errors import RelayError, TestbedError
from testbed.model.names import STATE_ROOT
from testbed.relay import topics
from testbed.relay.cancel import end_if_cancel_was_swallowed
from testbed.relay.wire import peek_meta

__all__ = ["AgentConfig", "Agent", "Handlers", "HEARTBEAT_S", "SILENT_AFTER_S", "status_doc", "agent_config_path",
           "threads_for_quota", "pad_to_profile", "torch_threads", "run_agent", "main"]

log = logging.getLogger("testbed.agent")

#: A 4 MiB send buffer: paho writes a large message (a split step's 7-14 MB of features)
#: by slicing off what the socket took at each write; a large buffer takes it in few
#: writes, so a CPU-quota'd agent spends its quota on the model, not on copying bytes.
#: TCP_NODELAY: a message's last short segment leaves at once instead of waiting for the
#: ACK of the previous message's (Nagle against delayed ACKs: back-to-back 9 KB messages
#: made a 92 ms round trip through mosquitto here, 2.8 ms with it; patch steps exchange
#: such messages at every layer).
SOCKET_OPTIONS = ((socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 2**20), (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1))

#: An agent refreshes its retained "online" status this often (its `ts` says when): a reader
#: tells a live agent from one that connected once and then hung (SIGSTOP, a stuck loop).
HEARTBEAT_S = 2.0
#: Silent this long (three missed heartbeats): the agent is down. Below the broker's own
#: keepalive bound (1.5 x keepalive_s = 7.5 s), after which it fires the agent's will.
SILENT_AFTER_S = 3 * HEARTBEAT_S

#: handlers[method] = "module:factory"; factory(agent) -> a handler object with
#: `async handle(client, payload)` and counters `served`, `rejected` (methods/device.py
#: builds this table from the method registry).
Handlers = Mapping[str, str]


@dataclass(frozen=True)
class AgentConfig:
    run: str
    device: str
    broker_host: str
    broker_port: int
    username: str
    password: str
    model: str = "tiny"
    precision: str = "fp32"
    compute: str = "profile"  # "profile" | "real"
    step_time_s: float = 0.0  # the profile's seconds per step (compute: profile)
    cpu_cores: float = 1.0  # the node's CPU quota in cores
    payload_bytes: int = 262144
    max_message_bytes: int = 262144 + 4 * 2**20
    keepalive_s: int = 5

    @classmethod
    def from_file(cls, path: Path) -> AgentConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RelayError(f"agent config {path}: cannot read ({e}); the runner writes it before starting agents") from None
        return cls.from_json(data, str(path))

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "agent config") -> AgentConfig:
        """A config from its JSON document (a file's, or a Swarm device's secret); unknown keys refused."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise RelayError(f"{source}: unknown keys {unknown}")
        return cls(**data)

    def write(self, path: Path) -> None:
        from testbed.relay.security import write_private

        write_private(Path(path), json.dumps(self.__dict__, indent=2) + "\n")


def agent_config_path(run: str, device: str, state_root: Path = STATE_ROOT) -> Path:
    return state_root / run / "agents" / f"{device}.json"


def threads_for_quota(cpu_cores: float) -> int:
    """torch threads for a CPU quota: whole cores, at least one (threads share the quota,
    so 2 threads under a 0.25-core quota run ~11x slower than 1, measured here)."""
    return max(1, int(math.floor(cpu_cores + 1e-9)))


class Agent:
    """One device's relay loop. `model` is a `stage.StageModel` (or anything with
    `latent_spec` and `run(...)`)."""

    def __init__(self, cfg: AgentConfig, model: Any, handlers: Handlers):
        self.cfg = cfg
        self.model = model
        self.handlers = dict(handlers)
        self.client: Any = None  # the connected aiomqtt client, while connected
        self.task_topic = topics.task(cfg.run, cfg.device)
        self.result_topic = topics.result(cfg.run, cfg.device)
        self.status_topic = topics.status(cfg.run, cfg.device)
        self._made: dict[str, Any] = {}
        self._rejected = 0

    @property
    def served(self) -> int:
        """Results handed to the broker client, over every method."""
        return sum(h.served for h in self._made.values())

    @property
    def rejected(self) -> int:
        """Tasks dropped as malformed, over every method (and those naming none)."""
        return self._rejected + sum(h.rejected for h in self._made.values())

    def status_doc(self, state: str, **extra: Any) -> bytes:
        return status_doc(self.cfg.device, state, **extra)

    async def serve(self, *, max_reconnects: int | None = None) -> None:
        """Serve tasks until cancelled; reconnect with exponential backoff (0.2 s .. 5 s)."""
        import aiomqtt

        backoff = 0.2
        failures = 0
        while True:
            try:
                will = aiomqtt.Will(self.status_topic, self.status_doc("offline"), qos=1, retain=True)
                async with aiomqtt.Client(
                    self.cfg.broker_host,
                    self.cfg.broker_port,
                    username=self.cfg.username,
                    password=self.cfg.password,
                    identifier=f"tb-{self.cfg.run}-{self.cfg.device}",
                    will=will,
                    keepalive=self.cfg.keepalive_s,
                    clean_session=True,
                    timeout=10,
                    socket_options=SOCKET_OPTIONS,
                ) as client:
                    self.client = client
                    await client.subscribe(self.task_topic, qos=1)
                    await client.publish(self.status_topic, self.status_doc("online"), qos=1, retain=True)
                    log.info("online: serving %s", self.task_topic)
                    backoff, failures = 0.2, 0
                    beat = asyncio.ensure_future(self._heartbeat(client))
                    try:
                        async for msg in client.messages:
                            await self.handle(client, bytes(msg.payload) if msg.payload is not None else b"")
                            end_if_cancel_was_swallowed()
                    finally:
                        beat.cancel()
                        # bounded: a heartbeat that swallowed its cancel ends at its next check
                        await asyncio.wait({beat}, timeout=HEARTBEAT_S + 1.0)
            except aiomqtt.MqttError as e:
                failures += 1
                if max_reconnects is not None and failures > max_reconnects:
                    raise RelayError(f"agent {self.cfg.device}: broker unreachable after {failures} tries ({e})") from None
                log.warning("broker connection lost (%s); reconnecting in %.1f s", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _heartbeat(self, client: Any) -> None:
        """The retained "online" status again every HEARTBEAT_S, with a fresh `ts` (also while
        a task computes: the model runs in a thread, this loop stays free)."""
        import aiomqtt

        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await client.publish(self.status_topic, self.status_doc("online"), qos=0, retain=True)
            except aiomqtt.MqttError:
                return  # the connection is gone: serve() reconnects and starts a new heartbeat
            end_if_cancel_was_swallowed()

    async def handle(self, client: Any, payload: bytes) -> None:
        """One task message, handed to the handler its `meta.method` names."""
        handler = await self._handler(peek_meta(payload).get("method"))
        if handler is not None:
            await handler.handle(client, payload)

    async def _handler(self, method: Any) -> Any:
        """The method's handler (made on its first task)."""
        if not isinstance(method, str) or method not in self.handlers:
            self._rejected += 1
            log.error("rejected relay message: meta.method %r (this agent serves %s); dropped",
                      method if isinstance(method, str) else type(method).__name__, ", ".join(self.handlers))
            return None
        if method not in self._made:
            module, _, factory = self.handlers[method].partition(":")
            make = getattr(importlib.import_module(module), factory)
            self._made[method] = await asyncio.to_thread(make, self)
        return self._made[method]


async def pad_to_profile(t_recv: float, profile_s: float) -> float:
    """`compute: profile`: the work takes the profile's time from the task's arrival to the
    result's departure — sleep until `t_recv + profile_s`, or return how late it already is
    (the overrun: slower real work is recorded, never hidden)."""
    late_s = time.time() - (t_recv + profile_s)
    if late_s >= 0:
        return late_s
    while (left := t_recv + profile_s - time.time()) > 0:  # the loop's clock may wake early
        await asyncio.sleep(left)
    return 0.0


def status_doc(device: str, state: str, **extra: Any) -> bytes:
    """A device's status message (what the orchestrator's one door parses)."""
    return json.dumps({"state": state, "device": device, "pid": os.getpid(), "ts": time.time(), **extra}).encode()


def torch_threads() -> int | None:
    mod = sys.modules.get("torch")
    return int(mod.get_num_threads()) if mod is not None else None


def set_threads(cpu_cores: float) -> int:
    import torch

    n = threads_for_quota(cpu_cores)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (a forked agent inherits the template's pool)
        pass
    return n


def run_agent(cfg: AgentConfig, handlers: Handlers) -> None:
    """Load the model, set threads, serve forever (the console script's body)."""
    from testbed.relay.stage import StageModel

    n = set_threads(cfg.cpu_cores)
    t0 = time.time()
    model = StageModel.load(cfg.model, cfg.precision)
    log.info("%s: model %s/%s loaded in %.2f s, %d torch threads (quota %.2f cores), compute %s",
             cfg.device, cfg.model, cfg.precision, time.time() - t0, n, cfg.cpu_cores, cfg.compute)
    asyncio.run(Agent(cfg, model, handlers).serve())


def main(argv: list[str] | None, handlers: Handlers) -> None:
    """`testbed-agent RUN DEVICE [--config FILE]` serving `handlers` (methods/device.py)."""
    p = argparse.ArgumentParser(prog="testbed-agent", description="testbed device agent (started by the runner)")
    p.add_argument("run")
    p.add_argument("device")
    p.add_argument("--config", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {args.device} %(levelname)s %(message)s")
    path = args.config or Path(os.environ.get("TESTBED_AGENT_CONFIG") or agent_config_path(args.run, args.device))
    try:
        cfg = AgentConfig.from_file(path)
        if (cfg.run, cfg.device) != (args.run, args.device):
            raise RelayError(f"agent config {path} is for {cfg.run}/{cfg.device}, not {args.run}/{args.device}")
        run_agent(cfg, handlers)
    except TestbedError as e:
        log.error("%s", e)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)

