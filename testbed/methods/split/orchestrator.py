"""The edge server's side of split diffusion: one UNet evaluation per step across two devices.

The scheduler loop is the diffusion workload's own (`run_stage`), run in a worker thread
with its UNet call replaced by a network round trip (the loop stays visible):

    server --task{x_in, t, cond} padded to payload_bytes--> head     (head segment)
    head --result{features} padded to SD1.5's cut size--> server
    server --task{features} padded to the same size--> tail          (tail segment)
    tail --result{noise} padded to payload_bytes--> server            (CFG mix + scheduler step)

The server keeps the latent (the checkpoint) and does the scheduler step; every message
crosses the shaped links through the broker. Each hop is timed like the multi-stage relay
(server.py): t_down = agent receive - server publish, t_cmp = agent send - agent receive,
t_up = server receive - agent send; energy = the device's rx/compute/tx power x those
times. The server's own store-and-forward time between the head's result and the tail's
task is recorded as `t_relay_s` (counted in the latency, not in either device's times).
No recovery: a device that goes offline or misses its deadline fails the run
(RunFailedError) — split inference has no checkpoint a third device could continue from
without the same two segments.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from testbed.errors import RelayError, RunFailedError
from testbed.methods.split.messages import SplitMeta, split_meta
from testbed.methods.split.plan import SplitPlan
from testbed.relay.orchestrator import DevicePower, Job, Orchestrator, RelaySettings, Timing
from testbed.relay.stage import to_numpy
from testbed.relay.wire import Message

__all__ = ["SplitStepRecord", "SplitOutcome", "SplitOrchestrator"]


@dataclass
class SplitStepRecord:
    """One denoising step: the head's and the tail's measured hops (seconds, joules)."""

    step: int
    head: str
    tail: str
    t_lat_down_s: float
    t_head_cmp_s: float
    t_feat_up_s: float
    t_relay_s: float
    t_feat_down_s: float
    t_tail_cmp_s: float
    t_noise_up_s: float
    e_head_j: float
    e_tail_j: float
    overrun_s: float
    cmp_real_s: float
    bytes_features: int
    bytes_latent: int
    predicted: dict[str, float]

    @property
    def energy_j(self) -> float:
        return self.e_head_j + self.e_tail_j

    def to_json(self) -> dict[str, Any]:
        """A stage record shaped like the multi-stage relay's (one per step), with both hops."""
        return {
            "device": f"{self.head}>{self.tail}",
            "steps": [self.step, self.step + 1],
            "t_down_s": self.t_lat_down_s + self.t_feat_down_s,
            "t_cmp_s": self.t_head_cmp_s + self.t_tail_cmp_s,
            "t_up_s": self.t_feat_up_s + self.t_noise_up_s,
            "t_relay_s": self.t_relay_s,
            "energy_j": self.energy_j,
            "overrun_s": self.overrun_s,
            "cmp_real_s": self.cmp_real_s,
            "bytes_down": self.bytes_latent + self.bytes_features,
            "bytes_up": self.bytes_features + self.bytes_latent,
            "predicted": self.predicted,
            "head": {"device": self.head, "t_down_s": self.t_lat_down_s, "t_cmp_s": self.t_head_cmp_s,
                     "t_up_s": self.t_feat_up_s, "energy_j": self.e_head_j},
            "tail": {"device": self.tail, "t_down_s": self.t_feat_down_s, "t_cmp_s": self.t_tail_cmp_s,
                     "t_up_s": self.t_noise_up_s, "energy_j": self.e_tail_j},
        }


@dataclass
class _Hop:
    t_down_s: float
    t_cmp_s: float
    t_up_s: float
    t_pub: float
    t_in: float
    overrun_s: float
    cmp_real_s: float
    msg: Message
    wire_bytes: int


@dataclass
class SplitOutcome:
    records: list[SplitStepRecord]
    latent: Any
    latency_s: float
    energy_j: float
    total_steps: int


class SplitOrchestrator(Orchestrator):
    """One split-diffusion generation over MQTT, on `plan` (head, tail, steps). The job's
    model is the server's fp32 model: its scheduler config, initial latent, conditioning and
    decoder; the UNet itself is never called on the server."""

    method = "split"
    result_meta = split_meta

    def __init__(self, settings: RelaySettings, job: Job, power: dict[str, DevicePower], *, plan: SplitPlan,
                 emit: Callable[[dict[str, Any]], None] | None = None, timing: Timing = Timing()):
        super().__init__(settings, job, power, emit=emit, timing=timing)
        self.plan = plan
        self._records: list[SplitStepRecord] = []
        self._n_calls = 0

    async def generate(self) -> SplitOutcome:
        from testbed.diffusion.models import encode_prompt, initial_latent
        from testbed.diffusion.stages import num_schedule_steps

        plan, model = self.plan, self.job.model.model
        await self.wait_online([plan.head, plan.tail])
        while not self.inbox.empty():
            self.inbox.get_nowait()
        n = plan.steps
        self._n_calls = num_schedule_steps(self.job.scheduler, n, model)
        latent = initial_latent(model, self.job.seed)
        cond = encode_prompt(model, self.job.prompt)
        await self.emit("run_started", relay_order=[plan.head, plan.tail], total_steps=n, plan=plan.to_json())
        timeout_s = self.deadline_s(plan.step.latency_s) * 2 + 10
        self._records = []
        out, latency, energy = await self.denoise(latent, cond, n, timeout_s, self._records)
        return SplitOutcome(list(self._records), out, latency, energy, n)

    async def step(self, x_in: Any, t: Any, kw: dict[str, Any]) -> Any:
        import torch

        plan, i = self.plan, len(self._records)
        c = plan.step
        tensors = {"x_in": to_numpy(x_in), "t": np.asarray(t.detach().cpu().reshape(1).numpy(), dtype=np.int64)}
        tensors.update({f"cond.{k}": to_numpy(v) for k, v in kw.items()})
        head = await self._hop(i, plan.head, "head", tensors, pad_task=self.job.payload_bytes,
                               pad_result=c.feature_bytes, share=plan.head_flop_share,
                               predicted_s=c.t_lat_down_s + c.t_head_cmp_s + c.t_feat_up_s)
        tail = await self._hop(i, plan.tail, "tail", head.msg.tensors, pad_task=c.feature_bytes,
                               pad_result=self.job.payload_bytes, share=1.0 - plan.head_flop_share,
                               predicted_s=c.t_feat_down_s + c.t_tail_cmp_s + c.t_noise_up_s)
        ph, pt = self.power[plan.head], self.power[plan.tail]
        rec = SplitStepRecord(
            step=i, head=plan.head, tail=plan.tail,
            t_lat_down_s=head.t_down_s, t_head_cmp_s=head.t_cmp_s, t_feat_up_s=head.t_up_s,
            t_relay_s=tail.t_pub - head.t_in,
            t_feat_down_s=tail.t_down_s, t_tail_cmp_s=tail.t_cmp_s, t_noise_up_s=tail.t_up_s,
            e_head_j=ph.energy_j(head.t_down_s, head.t_cmp_s, head.t_up_s),
            e_tail_j=pt.energy_j(tail.t_down_s, tail.t_cmp_s, tail.t_up_s),
            overrun_s=head.overrun_s + tail.overrun_s, cmp_real_s=head.cmp_real_s + tail.cmp_real_s,
            bytes_features=head.wire_bytes, bytes_latent=tail.wire_bytes,
            predicted={"t_down_s": c.t_lat_down_s + c.t_feat_down_s, "t_cmp_s": c.t_head_cmp_s + c.t_tail_cmp_s,
                       "t_up_s": c.t_feat_up_s + c.t_noise_up_s, "t_handling_s": c.t_handling_s,
                       "energy_j": c.energy_j},
        )
        self._records.append(rec)
        doc = rec.to_json()
        await self.emit("split_step", device=doc["device"], steps=doc["steps"], stage=i, t_down_s=doc["t_down_s"],
                        t_cmp_s=doc["t_cmp_s"], t_up_s=doc["t_up_s"], energy_j=doc["energy_j"],
                        predicted=doc["predicted"], record=doc)
        return torch.from_numpy(np.array(tail.msg.tensors["noise"], copy=True))

    async def _hop(self, i: int, dev: str, role: str, tensors: dict[str, np.ndarray], *, pad_task: int,
                   pad_result: int, share: float, predicted_s: float) -> _Hop:
        """Send one segment's task to `dev` and wait (bounded) for its result."""
        total = max(self._n_calls, i + 1)
        data = self.task(dev, stage=i, steps=(i, i + 1), total_steps=total, tensors=tensors,
                         meta={"role": role, "share": share, "pad_to": pad_result}, pad_to_bytes=pad_task)
        t_pub = time.time()
        await self.publish_task(dev, data)
        deadline_s = self.deadline_s(predicted_s)
        deadline = time.monotonic() + deadline_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunFailedError(f"split step {i}: the {role} device {dev} missed its deadline "
                                     f"({deadline_s:.1f} s); see its split agent log")
            try:
                leaf, who, body, t_in = await asyncio.wait_for(self.inbox.get(), timeout=left)
            except TimeoutError:
                continue
            if leaf == "broker":
                raise RunFailedError(f"split step {i}: {body}; split inference cannot resume without both segments")
            if who != dev:
                continue
            if leaf == "status" and body.state == "offline":
                raise RunFailedError(f"split step {i}: the {role} device {dev} went offline; split inference "
                                     "cannot continue without both segments")
            if leaf != "result":
                continue
            try:
                msg, m = self._check_result(dev, body, i, role, total)
            except RelayError as e:
                await self.reject(dev, str(e), steps=[i, i + 1])
                continue
            return _Hop(t_down_s=m.t_recv - t_pub, t_cmp_s=m.t_send - m.t_recv, t_up_s=t_in - m.t_send, t_pub=t_pub,
                        t_in=t_in, overrun_s=m.overrun_s, cmp_real_s=m.cmp_real_s, msg=msg, wire_bytes=len(body))

    def _check_result(self, dev: str, payload: bytes, i: int, role: str, total: int) -> tuple[Message, SplitMeta]:
        """A hop's result through the one door, then this hop's own checks."""
        res = self.decode_result(dev, payload, total_steps=total)
        msg, meta = res.message, res.meta
        if msg.stage != i or meta.role != role:
            raise RelayError(f"result for step {msg.stage} role {meta.role!r}, expected step {i} role {role!r}")
        need = {"sample", "emb"} if role == "head" else {"noise"}
        if not need <= set(msg.tensors):
            raise RelayError(f"{role} result lacks tensors {sorted(need - set(msg.tensors))}")
        return msg, meta
