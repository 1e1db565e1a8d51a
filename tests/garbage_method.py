"""A test-only method whose device agents send garbage for their first task: a compromised
device, attacking from its own namespace with its own credentials, mid-run.

"garbage" is the multi-stage relay (its plan, orchestrator, recovery) whose tasks say
`meta.method: garbage`, so every agent of the run serves them with `GarbageHandler`: the
first attempt of stage 0 — the first selected device's task — is answered only with
malformed messages on the device's own status and result topics (bad types, JSON nested
100 000 deep, a status over 4 KiB, a wire header over 64 KiB, a latent of the wrong shape,
another device's name), never with a result; every later task is served as multi-stage
serves it. The one door must turn each into a `status_rejected` / `result_rejected` event
naming that device, the device must miss its deadline saying why, and the run must go on
by recovery (tests/test_device_messages.py). Registered through TESTBED_METHODS=garbage_method.
"""

from __future__ import annotations

import json
import logging
import struct
from typing import Any, ClassVar

import numpy as np

from testbed.methods import Line, MethodSpec, register
from testbed.methods.base import Outcome, RunContext, energy_by_device
from testbed.methods.multistage.agent import StageHandler
from testbed.methods.multistage.orchestrator import MultistageOrchestrator
from testbed.methods.multistage.strategy import Multistage, MultistagePlan
from testbed.relay import topics
from testbed.relay.wire import MAGIC, WIRE_VERSION, Message, decode, encode

register(MethodSpec(
    name="garbage", summary="multi-stage whose first device answers with malformed messages (a test-only plug-in)",
    strategy=f"{__name__}:Garbage", agent_handler=f"{__name__}:garbage_handler", recovers=True,
    lines={"*": Line("garbage", "#7f7f7f", "x")},
))

log = logging.getLogger("testbed.agent")


def bad_statuses(device: str) -> list[bytes]:
    """What the device sends on its status topic instead of "computing"."""
    return [
        b'{"state": "computing", "stage": "x", "attempt": 1}',  # a bad type
        b'{"t_recv": "abc"}',  # the ValueError, and no state
        b"[" * 100_000,  # the RecursionError (refused by its size first)
        b'{"state": "online", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}",  # nested 1001 deep, in 2 KiB
        json.dumps({"state": "online", "pad": "x" * 5000}).encode(),  # over 4 KiB
        json.dumps({"state": "offline", "device": "not-" + device}).encode(),  # speaking for another
    ]


def bad_results(task: Message, spec: Any) -> list[bytes]:
    """What the device sends on its result topic instead of the stage's latent (`spec`: the
    latent's TensorSpec, so that only the part under test is wrong)."""

    def result(meta: dict[str, Any], latent: np.ndarray | None = None) -> bytes:
        tensors = {"latent": latent if latent is not None else np.zeros(spec.shape, spec.dtype)}
        return bytes(encode(Message(kind="result", run=task.run, device=task.device, stage=task.stage,
                                    attempt=task.attempt, steps=task.steps, total_steps=task.total_steps,
                                    tensors=tensors, meta=meta)))

    nested: Any = 1
    for _ in range(20):
        nested = [nested]
    good_meta = {"t_recv": 1.8e9, "t_send": 1.8e9 + 0.1, "task": task.meta.get("task"), "sched": {}}
    return [
        b"[" * 100_000,  # not a relay message at all
        result({**good_meta, "t_recv": "abc"}),  # a bad type in the meta
        result({**good_meta, "deep": nested}),  # meta nested deeper than 8
        header_over_64k(task, {**good_meta, "junk": "x" * 70_000}),  # (encode() refuses to make one)
        result(good_meta, np.zeros((64, 64, 64), np.float32)),  # a latent of the wrong shape (1 MiB)
    ]


def header_over_64k(task: Message, meta: dict[str, Any]) -> bytes:
    """A relay message whose header is over the wire format's 64 KiB (prefix: magic, length)."""
    header = json.dumps({"v": WIRE_VERSION, "kind": "result", "run": task.run, "device": task.device,
                         "meta": meta}).encode()
    return struct.pack(">4sI", MAGIC, len(header)) + header


class GarbageHandler:
    """Stage 0's first attempt answered with garbage only; everything else served as multi-stage."""

    def __init__(self, agent: Any):
        self.cfg, self.spec = agent.cfg, agent.model.latent_spec
        self.inner = StageHandler(agent.cfg, agent.model)
        self.sent_garbage = 0

    @property
    def served(self) -> int:
        return self.inner.served

    @property
    def rejected(self) -> int:
        return self.inner.rejected

    async def handle(self, client: Any, payload: bytes) -> None:
        cfg = self.cfg
        task = decode(payload, max_bytes=cfg.max_message_bytes, run=cfg.run, kind="task", device=cfg.device)
        if (task.stage, task.attempt) != (0, 1):
            await self.inner.handle(client, payload)
            return
        for doc in bad_statuses(cfg.device):
            await client.publish(topics.status(cfg.run, cfg.device), doc, qos=1)
        for doc in bad_results(task, self.spec):
            await client.publish(topics.result(cfg.run, cfg.device), doc, qos=1)
        self.sent_garbage += 1
        log.warning("garbage: answered stage 0 attempt 1 with malformed messages only")


def garbage_handler(agent: Any) -> GarbageHandler:
    return GarbageHandler(agent)


class GarbageOrchestrator(MultistageOrchestrator):
    method = "garbage"


class Garbage(Multistage):
    name: ClassVar[str] = "garbage"

    async def execute(self, run: RunContext, plan: MultistagePlan) -> Outcome:
        candidates = [c.id for c in plan.costs]
        await run.services.ensure_agents(candidates)
        wl = run.topology.workload
        out = await run.orchestrate(lambda settings, job, power: GarbageOrchestrator(
            settings, job, power, plan=plan, steps_per_stage=wl.steps_per_stage, t_max_s=run.t_max_s,
            e_max_j=run.e_max_j, emit=run.services.event_sink(), timing=run.timing(len(candidates))))
        spent = [(s.device, s.energy_j) for s in out.stages] + [(r.device, r.energy_j) for r in out.recovered]
        return Outcome(stages=[s.to_json() for s in out.stages], latent=out.latent, latency_s=out.latency_s,
                       energy_j=out.energy_j, total_steps=out.total_steps,
                       relay_order=[s.device for s in out.stages], energy_by_device=energy_by_device(spent),
                       recovered=[r.to_json() for r in out.recovered], rejected_results=out.rejected_results)
