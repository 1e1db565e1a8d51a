"""The device agent: `testbed-agent <run> <device>` runs one relay stage per task message.

Started inside the device's node (namespace or container, under its cgroup). It loads its
local model variant, connects to the broker with its own credentials (last will: retained
"offline" on its status topic), publishes "online", and serves its task topic: decode and
validate the message (wire.py), tell the server it started computing, run the stage,
pad to the profile time in `compute: profile` mode (recording any overrun: a slower real
computation is never reported as the profile time), and upload the result padded to the
workload's payload size. Bad payloads are logged and dropped; the agent keeps serving and
reconnects with backoff when the broker goes away.

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
from typing import Any

from testbed.errors import RelayError, TestbedError
from testbed.model.names import STATE_ROOT
from testbed.relay import topics
from testbed.relay.wire import Message, decode, encode, peek_meta

__all__ = ["AgentConfig", "Agent", "agent_config_path", "threads_for_quota", "main"]

log = logging.getLogger("testbed.agent")

#: A 4 MiB send buffer: paho writes a large message (a split step's 7-14 MB of features)
#: by slicing off what the socket took at each write; a large buffer takes it in few
#: writes, so a CPU-quota'd agent spends its quota on the model, not on copying bytes.
#: TCP_NODELAY: a message's last short segment leaves at once instead of waiting for the
#: ACK of the previous message's (Nagle against delayed ACKs: back-to-back 9 KB messages
#: made a 92 ms round trip through mosquitto here, 2.8 ms with it; patch steps exchange
#: such messages at every layer).
SOCKET_OPTIONS = ((socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 2**20), (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1))

#: Task handlers of the collaboration methods besides multi-stage, by `meta.method`:
#: "module:factory", factory(agent) -> async handler(client, payload). One agent process
#: per device serves every method; a new method adds its line here.
METHOD_HANDLERS = {"split": "testbed.relay.split_agent:task_handler",
                   "patch": "testbed.relay.patch_agent:task_handler"}


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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RelayError(f"agent config {path}: unknown keys {unknown}")
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

    def __init__(self, cfg: AgentConfig, model: Any):
        self.cfg = cfg
        self.model = model
        self.served = 0
        self.rejected = 0
        self.client: Any = None  # the connected aiomqtt client, while connected
        self._task = topics.task(cfg.run, cfg.device)
        self._result = topics.result(cfg.run, cfg.device)
        self._status = topics.status(cfg.run, cfg.device)
        self._handlers: dict[str, Any] = {}

    def _status_doc(self, state: str, **extra: Any) -> bytes:
        return json.dumps({"state": state, "device": self.cfg.device, "pid": os.getpid(), "ts": time.time(), **extra}).encode()

    async def serve(self, *, max_reconnects: int | None = None) -> None:
        """Serve tasks until cancelled; reconnect with exponential backoff (0.2 s .. 5 s)."""
        import aiomqtt

        backoff = 0.2
        failures = 0
        while True:
            try:
                will = aiomqtt.Will(self._status, self._status_doc("offline"), qos=1, retain=True)
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
                    await client.subscribe(self._task, qos=1)
                    await client.publish(self._status, self._status_doc("online"), qos=1, retain=True)
                    log.info("online: serving %s", self._task)
                    backoff, failures = 0.2, 0
                    async for msg in client.messages:
                        await self.handle(client, bytes(msg.payload) if msg.payload is not None else b"")
            except aiomqtt.MqttError as e:
                failures += 1
                if max_reconnects is not None and failures > max_reconnects:
                    raise RelayError(f"agent {self.cfg.device}: broker unreachable after {failures} tries ({e})") from None
                log.warning("broker connection lost (%s); reconnecting in %.1f s", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def handle(self, client: Any, payload: bytes) -> None:
        """One task message: dispatched by its `meta.method` (multi-stage by default)."""
        method = peek_meta(payload).get("method", "multistage")
        if method != "multistage":
            handler = await self._handler(method)
            if handler is not None:
                await handler(client, payload)
            return
        await self._handle_stage(client, payload)

    async def _handler(self, method: Any) -> Any:
        """The task handler of another collaboration method (made on its first task)."""
        if method not in self._handlers:
            where = METHOD_HANDLERS.get(method) if isinstance(method, str) else None
            if where is None:
                self.rejected += 1
                log.error("rejected relay message: unknown method %r (known: multistage, %s); dropped",
                          method, ", ".join(METHOD_HANDLERS))
                return None
            module, _, factory = where.partition(":")
            make = getattr(importlib.import_module(module), factory)
            self._handlers[method] = await asyncio.to_thread(make, self)
        return self._handlers[method]

    async def _handle_stage(self, client: Any, payload: bytes) -> None:
        t_recv = time.time()
        try:
            task = decode(
                payload,
                max_bytes=self.cfg.max_message_bytes,
                run=self.cfg.run,
                kind="task",
                device=self.cfg.device,
                expect={"latent": self.model.latent_spec},
                max_tensor_bytes=self.cfg.max_message_bytes,
            )
            sched_kind = task.meta.get("scheduler", "ddim")
            if not isinstance(sched_kind, str):
                raise RelayError("rejected relay message: meta.scheduler must be a string")
            sched_scalars = task.meta.get("sched", {})
            if not isinstance(sched_scalars, dict):
                raise RelayError("rejected relay message: meta.sched must be an object")
        except RelayError as e:
            self.rejected += 1
            log.error("%s (%d bytes on %s); dropped, still serving", e, len(payload), self._task)
            return
        a, b = task.steps
        log.info("stage %d attempt %d: steps [%d, %d) of %d, %d bytes", task.stage, task.attempt, a, b,
                 task.total_steps, len(payload))
        # tell the server (in the background: the computation starts at once)
        status = asyncio.ensure_future(client.publish(
            self._status,
            self._status_doc("computing", stage=task.stage, attempt=task.attempt, steps=[a, b], t_recv=t_recv),
            qos=1,
        ))
        try:
            out_msg = await self._compute(task, sched_kind, sched_scalars, t_recv)
        except TestbedError as e:
            log.error("stage %d failed: %s", task.stage, e)
            return
        except Exception as e:  # noqa: BLE001 - a model failure must not kill the agent
            log.exception("stage %d failed: %s", task.stage, e)
            return
        finally:
            await status
        out_msg.meta["t_send"] = time.time()
        data = encode(out_msg, pad_to_bytes=self.cfg.payload_bytes)
        await client.publish(self._result, data, qos=1)
        self.served += 1
        log.info("stage %d uploaded: %d bytes (%d padding)", task.stage, len(data), out_msg.pad_bytes)

    async def _compute(self, task: Message, sched_kind: str, sched_scalars: dict, t_recv: float) -> Message:
        from testbed.relay.stage import pack_task_tensors, unpack_task_tensors

        latent, cond, state = unpack_task_tensors(task.tensors, sched_scalars)
        a, b = task.steps
        t0 = time.time()
        new_latent, new_state = await asyncio.to_thread(
            self.model.run, latent, cond, a, b, task.total_steps, sched_kind, state
        )
        real_s = time.time() - t0
        tensors, scalars = pack_task_tensors(new_latent, {}, new_state)
        # compute: profile — the stage takes the profile's time from the task's arrival to the
        # result's departure; work that took longer is recorded as overrun, never hidden
        profile_s = self.cfg.step_time_s * (b - a) if self.cfg.compute == "profile" else None
        overrun_s = 0.0
        if profile_s is not None:
            late_s = time.time() - (t_recv + profile_s)
            if late_s < 0:
                while (left := t_recv + profile_s - time.time()) > 0:  # the loop's clock may wake early
                    await asyncio.sleep(left)
            else:
                overrun_s = late_s
                log.warning("stage %d: real work %.3f s (compute %.3f s) overran the profile's %.3f s", task.stage,
                            time.time() - t_recv, real_s, profile_s)
        t1 = time.time()
        meta = {
            "sched": scalars,
            "scheduler": sched_kind,
            "t_recv": t_recv,
            "t_cmp_start": t0,
            "t_cmp_end": t1,
            "cmp_real_s": real_s,
            "cmp_profile_s": profile_s,
            "overrun_s": overrun_s,
            "compute": self.cfg.compute,
            "model": self.cfg.model,
            "precision": self.cfg.precision,
            "compute_dtype": getattr(self.model, "compute_dtype", None),
            "threads": _torch_threads(),
            "task": task.meta.get("task"),  # echo the task's id: the server takes only the result of what it sent
        }
        return Message(kind="result", run=task.run, device=self.cfg.device, stage=task.stage, attempt=task.attempt,
                       steps=task.steps, total_steps=task.total_steps, tensors=tensors, meta=meta)


def _torch_threads() -> int | None:
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


def run_agent(cfg: AgentConfig) -> None:
    """Load the model, set threads, serve forever (the console script's body)."""
    from testbed.relay.stage import StageModel

    n = set_threads(cfg.cpu_cores)
    t0 = time.time()
    model = StageModel.load(cfg.model, cfg.precision)
    log.info("%s: model %s/%s loaded in %.2f s, %d torch threads (quota %.2f cores), compute %s",
             cfg.device, cfg.model, cfg.precision, time.time() - t0, n, cfg.cpu_cores, cfg.compute)
    asyncio.run(Agent(cfg, model).serve())


def main(argv: list[str] | None = None) -> None:
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
        run_agent(cfg)
    except TestbedError as e:
        log.error("%s", e)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
