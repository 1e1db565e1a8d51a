"""The split-diffusion task handler of a device's agent (`meta.method` "split").

The device's one agent (relay/agent.py) hands it split tasks: same config, credentials
and topics as multi-stage (it reads only its own task topic and writes only its own
result topic). Each task asks for one segment of one denoising step:

    role head: tensors x_in, t, cond.* -> conv_in + time embedding + down blocks -> features
    role tail: the features (relayed by the server) -> mid + up blocks + conv_out -> noise

In `compute: profile` the segment takes its share of the profile's step time
(`meta.share` x `step_time_s`) counted from the task's receipt, as the multi-stage agent
does (decoding is inside that time); overruns are recorded, never hidden. The
result goes up zero-padded to `meta.pad_to` bytes: SD1.5's cut tensors for the head, the
relayed latent size for the tail. One agent serves whichever role the server's plan
gives its device.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np

from testbed.errors import RelayError
from testbed.relay import topics
from testbed.relay.agent import Agent, AgentConfig, pad_to_profile
from testbed.relay.stage import to_numpy
from testbed.relay.wire import Message, TensorSpec, decode, encode

__all__ = ["ROLES", "SplitModel", "SplitHandler", "task_handler"]

log = logging.getLogger("testbed.split_agent")
ROLES = ("head", "tail")


class SplitModel:
    """A device's local model variant cut in two (diffusion.split.SplitRunner)."""

    def __init__(self, model: Any):
        from testbed.diffusion.split import SplitRunner

        self.model = model  # the agent's own variant: the cut only reads its modules
        self.runner = SplitRunner(self.model.unet)

    @property
    def latent_spec(self) -> TensorSpec:  # what Agent's interface expects; split tasks check their own
        return TensorSpec("float32", tuple(int(d) for d in self.model.latent_shape))

    def head(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        dtype = self.model.compute_dtype
        x = torch.from_numpy(np.array(tensors["x_in"], copy=True)).to(dtype)
        t = torch.from_numpy(np.array(tensors["t"], copy=True)).reshape(())
        cond = {}
        for k, v in tensors.items():
            if k.startswith("cond."):
                c = torch.from_numpy(np.array(v, copy=True))
                cond[k[5:]] = c.to(dtype) if c.is_floating_point() else c
        with torch.inference_mode():
            feats = self.runner.head(x, t, cond)
        return {k: to_numpy(v) for k, v in feats.items()}

    def tail(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        dtype = self.model.compute_dtype
        feats = {}
        for k, v in tensors.items():
            f = torch.from_numpy(np.array(v, copy=True))
            feats[k] = f.to(dtype) if f.is_floating_point() else f
        with torch.inference_mode():
            noise = self.runner.tail(feats)
        return {"noise": to_numpy(noise.float())}


class SplitHandler:
    """Split tasks on one device: the head or the tail segment of its model, per task."""

    def __init__(self, cfg: AgentConfig, model: SplitModel, roles: tuple[str, ...] = ROLES):
        self.cfg, self.model, self.roles = cfg, model, roles
        self.served = 0
        self.rejected = 0

    async def handle(self, client: Any, payload: bytes) -> None:
        t_recv = time.time()
        try:
            task = decode(payload, max_bytes=self.cfg.max_message_bytes, run=self.cfg.run, kind="task",
                          device=self.cfg.device, max_tensor_bytes=self.cfg.max_message_bytes)
            role = task.meta.get("role")
            if role not in self.roles:
                raise RelayError(f"rejected relay message: role {role!r} (this agent serves {list(self.roles)})")
            share = task.meta.get("share")
            pad_to = task.meta.get("pad_to", 0)
            if not isinstance(share, (int, float)) or not 0 < share <= 1:
                raise RelayError(f"rejected relay message: meta.share {share!r} must be in (0, 1]")
            if type(pad_to) is not int or not 0 <= pad_to <= self.cfg.max_message_bytes:
                raise RelayError(f"rejected relay message: meta.pad_to {pad_to!r} out of range")
            if role == "head" and not {"x_in", "t"} <= set(task.tensors):
                raise RelayError("rejected relay message: a head task needs tensors 'x_in' and 't'")
            if role == "tail" and not {"sample", "emb"} <= set(task.tensors):
                raise RelayError("rejected relay message: a tail task needs tensors 'sample' and 'emb'")
        except RelayError as e:
            self.rejected += 1
            log.error("%s (%d bytes); dropped, still serving", e, len(payload))
            return
        try:
            fn = self.model.head if role == "head" else self.model.tail
            t0 = time.time()
            out = await asyncio.to_thread(fn, task.tensors)
            real_s = time.time() - t0
        except Exception as e:  # noqa: BLE001 - a model failure must not kill the agent
            log.exception("step %d %s failed: %s", task.stage, role, e)
            return
        # compute: profile — like the multi-stage agent, the segment takes its share of the
        # profile's step time from the task's arrival (decode included) to the result's
        # departure; work that took longer is recorded as overrun, never hidden
        profile_s = self.cfg.step_time_s * float(share) if self.cfg.compute == "profile" else None
        overrun_s = await pad_to_profile(t_recv, profile_s) if profile_s is not None else 0.0
        meta = {"role": role, "t_recv": t_recv, "t_cmp_start": t0, "cmp_real_s": real_s,
                "cmp_profile_s": profile_s, "overrun_s": overrun_s, "precision": self.cfg.precision,
                "t_send": time.time()}
        msg = Message(kind="result", run=task.run, device=self.cfg.device, stage=task.stage, attempt=task.attempt,
                      steps=task.steps, total_steps=task.total_steps, tensors=out, meta=meta)
        data = encode(msg, pad_to_bytes=pad_to)
        self.served += 1  # counted as it is handed over: the server may read it before the PUBACK returns
        await client.publish(topics.result(self.cfg.run, self.cfg.device), data, qos=1)
        log.info("step %d %s: real %.3f s, padded to %s, sent %d bytes", task.stage, role, real_s,
                 f"{profile_s:.3f} s" if profile_s is not None else "-", len(data))


def task_handler(agent: Agent) -> SplitHandler:
    """The split method's handler inside a device's agent: the device's model cut in two,
    made on the first split task from the model the agent has loaded (loading it again cost
    the first split step up to a second)."""
    return SplitHandler(agent.cfg, SplitModel(agent.model.model))
