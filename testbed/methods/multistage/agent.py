"""The multi-stage task handler of a device's agent (`meta.method` "multistage").

One task is one stage: decode and validate the latent (wire.py, the model's latent spec),
tell the server that computing started (`computing` status with the receipt time), run the
stage's K steps from the task's scheduler state, pad to the profile's time in `compute:
profile` mode, and upload the new latent and scheduler state padded to the workload's
payload size, with the task's id echoed (the server takes only the result of what it sent).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from testbed.errors import RelayError, TestbedError
from testbed.relay import topics
from testbed.relay.agent import Agent, AgentConfig, pad_to_profile, status_doc, torch_threads
from testbed.relay.stage import pack_task_tensors, unpack_task_tensors
from testbed.relay.wire import Message, decode, encode

__all__ = ["StageHandler", "task_handler"]

log = logging.getLogger("testbed.agent")


class StageHandler:
    """Stages of the multi-stage relay on one device. `model` is a `stage.StageModel` (or
    anything with `latent_spec`, `run(...)` and `compute_dtype`)."""

    def __init__(self, cfg: AgentConfig, model: Any):
        self.cfg, self.model = cfg, model
        self.served = 0
        self.rejected = 0

    async def handle(self, client: Any, payload: bytes) -> None:
        t_recv = time.time()
        cfg = self.cfg
        try:
            task = decode(payload, max_bytes=cfg.max_message_bytes, run=cfg.run, kind="task", device=cfg.device,
                          expect={"latent": self.model.latent_spec}, max_tensor_bytes=cfg.max_message_bytes)
            sched_kind = task.meta.get("scheduler", "ddim")
            if not isinstance(sched_kind, str):
                raise RelayError("rejected relay message: meta.scheduler must be a string")
            sched_scalars = task.meta.get("sched", {})
            if not isinstance(sched_scalars, dict):
                raise RelayError("rejected relay message: meta.sched must be an object")
        except RelayError as e:
            self.rejected += 1
            log.error("%s (%d bytes); dropped, still serving", e, len(payload))
            return
        a, b = task.steps
        log.info("stage %d attempt %d: steps [%d, %d) of %d, %d bytes", task.stage, task.attempt, a, b,
                 task.total_steps, len(payload))
        # tell the server (in the background: the computation starts at once)
        status = asyncio.ensure_future(client.publish(
            topics.status(cfg.run, cfg.device),
            status_doc(cfg.device, "computing", stage=task.stage, attempt=task.attempt, steps=[a, b], t_recv=t_recv),
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
        data = encode(out_msg, pad_to_bytes=cfg.payload_bytes)
        self.served += 1  # counted as it is handed over: the server may read it before the PUBACK returns
        await client.publish(topics.result(cfg.run, cfg.device), data, qos=1)
        log.info("stage %d uploaded: %d bytes (%d padding)", task.stage, len(data), out_msg.pad_bytes)

    async def _compute(self, task: Message, sched_kind: str, sched_scalars: dict, t_recv: float) -> Message:
        latent, cond, state = unpack_task_tensors(task.tensors, sched_scalars)
        a, b = task.steps
        t0 = time.time()
        new_latent, new_state = await asyncio.to_thread(
            self.model.run, latent, cond, a, b, task.total_steps, sched_kind, state
        )
        real_s = time.time() - t0
        tensors, scalars = pack_task_tensors(new_latent, {}, new_state)
        profile_s = self.cfg.step_time_s * (b - a) if self.cfg.compute == "profile" else None
        overrun_s = await pad_to_profile(t_recv, profile_s) if profile_s is not None else 0.0
        if overrun_s > 0:
            log.warning("stage %d: real work %.3f s (compute %.3f s) overran the profile's %.3f s", task.stage,
                        time.time() - t_recv, real_s, profile_s)
        meta = {
            "sched": scalars,
            "scheduler": sched_kind,
            "t_recv": t_recv,
            "t_cmp_start": t0,
            "t_cmp_end": time.time(),
            "cmp_real_s": real_s,
            "cmp_profile_s": profile_s,
            "overrun_s": overrun_s,
            "compute": self.cfg.compute,
            "model": self.cfg.model,
            "precision": self.cfg.precision,
            "compute_dtype": getattr(self.model, "compute_dtype", None),
            "threads": torch_threads(),
            "task": task.meta.get("task"),  # echo the task's id: the server takes only the result of what it sent
        }
        return Message(kind="result", run=task.run, device=self.cfg.device, stage=task.stage, attempt=task.attempt,
                       steps=task.steps, total_steps=task.total_steps, tensors=tensors, meta=meta)


def task_handler(agent: Agent) -> StageHandler:
    """The multi-stage handler inside a device's agent, on the model the agent loaded."""
    return StageHandler(agent.cfg, agent.model)
