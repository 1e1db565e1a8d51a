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
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from testbed.errors import RelayError, RunFailedError
from testbed.relay import topics
from testbed.relay.server_link import LinkOutcome, ServerLink
from testbed.relay.server import DevicePower
from testbed.selection.split_plan import SplitPlan
from testbed.relay.wire import Message, decode, encode

__all__ = ["SplitStepRecord", "SplitOrchestrator"]


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


class SplitOrchestrator(ServerLink):
    """One split-diffusion generation over MQTT, on `plan` (head, tail, steps).

    `model` is the server's `LocalModel` (fp32): its scheduler config, initial latent,
    conditioning and decoder; the UNet itself is never called on the server.
    """

    method = "split"

    def __init__(
        self,
        *,
        run: str,
        broker_host: str,
        broker_port: int,
        username: str,
        password: str,
        plan: SplitPlan,
        power: dict[str, DevicePower],
        model: Any,
        prompt: str,
        seed: int,
        scheduler: str,
        payload_bytes: int,
        emit: Callable[[dict[str, Any]], None] | None = None,
        online_timeout_s: float = 120.0,
        deadline_factor: float = 3.0,
        deadline_slack_s: float = 5.0,
    ):
        super().__init__(run, broker_host, broker_port, username, password, emit)
        self.plan = plan
        self.power = power
        self.model = model
        self.prompt, self.seed, self.scheduler = prompt, seed, scheduler
        self.payload_bytes = payload_bytes
        self.online_timeout_s = online_timeout_s
        self.deadline_factor, self.deadline_slack_s = deadline_factor, deadline_slack_s
        self.max_message_bytes = max(plan.step.feature_bytes, payload_bytes) + 4 * 2**20
        self.online: set[str] = set()
        self._inbox: asyncio.Queue[tuple[str, str, bytes, float]] = asyncio.Queue()
        self._records: list[SplitStepRecord] = []
        self._n_calls = 0

    async def _reader(self) -> None:
        async for msg in self._client.messages:
            parsed = topics.parse_device_topic(self.run_id, str(msg.topic))
            if parsed is None:
                continue
            dev, leaf = parsed
            payload = bytes(msg.payload) if msg.payload is not None else b""
            if leaf == "status":
                state = _json(payload).get("state")
                if state in ("online", "computing"):
                    self.online.add(dev)
                elif state == "offline":
                    self.online.discard(dev)
            await self._inbox.put((leaf, dev, payload, time.time()))

    async def run(self) -> LinkOutcome:
        return await self.run_connected(self._generate)

    async def wait_online(self, devices: list[str]) -> None:
        deadline = time.monotonic() + self.online_timeout_s
        while not set(devices) <= self.online:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RelayError(f"split devices {sorted(set(devices) - self.online)} did not come online within "
                                 f"{self.online_timeout_s:g} s; see their split agent logs")
            try:
                await asyncio.wait_for(self._inbox.get(), timeout=min(left, 0.5))
            except TimeoutError:
                pass

    async def _generate(self) -> LinkOutcome:
        from testbed.diffusion.models import encode_prompt, initial_latent
        from testbed.diffusion.stages import num_schedule_steps

        plan = self.plan
        await self.wait_online([plan.head, plan.tail])
        while not self._inbox.empty():
            self._inbox.get_nowait()
        n = plan.steps
        self._n_calls = num_schedule_steps(self.scheduler, n, self.model)
        latent = initial_latent(self.model, self.seed)
        cond = encode_prompt(self.model, self.prompt)
        await self.emit("run_started", relay_order=[plan.head, plan.tail], total_steps=n, plan=plan.to_json())
        timeout_s = self._deadline_s(plan.step.latency_s) * 2 + 10
        self._records = []
        return await self.denoise(self.model, latent, cond, n, self.scheduler, timeout_s, self._records)

    def _deadline_s(self, predicted_s: float) -> float:
        return self.deadline_factor * predicted_s + self.deadline_slack_s

    async def _step(self, x_in: Any, t: Any, kw: dict[str, Any]) -> Any:
        import torch

        plan, i = self.plan, len(self._records)
        c = plan.step
        tensors = {"x_in": _np(x_in), "t": np.asarray(t.detach().cpu().reshape(1).numpy(), dtype=np.int64)}
        tensors.update({f"cond.{k}": _np(v) for k, v in kw.items()})
        head = await self._hop(i, plan.head, "head", tensors, pad_task=self.payload_bytes,
                               pad_result=c.feature_bytes, share=plan.head_flop_share,
                               predicted_s=c.t_lat_down_s + c.t_head_cmp_s + c.t_feat_up_s)
        tail = await self._hop(i, plan.tail, "tail", head.msg.tensors, pad_task=c.feature_bytes,
                               pad_result=self.payload_bytes, share=1.0 - plan.head_flop_share,
                               predicted_s=c.t_feat_down_s + c.t_tail_cmp_s + c.t_noise_up_s)
        ph, pt = self.power[plan.head], self.power[plan.tail]
        rec = SplitStepRecord(
            step=i, head=plan.head, tail=plan.tail,
            t_lat_down_s=head.t_down_s, t_head_cmp_s=head.t_cmp_s, t_feat_up_s=head.t_up_s,
            t_relay_s=tail.t_pub - head.t_in,
            t_feat_down_s=tail.t_down_s, t_tail_cmp_s=tail.t_cmp_s, t_noise_up_s=tail.t_up_s,
            e_head_j=ph.rx_w * head.t_down_s + ph.compute_w * head.t_cmp_s + ph.tx_w * head.t_up_s,
            e_tail_j=pt.rx_w * tail.t_down_s + pt.compute_w * tail.t_cmp_s + pt.tx_w * tail.t_up_s,
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
        msg = Message(kind="task", run=self.run_id, device=dev, stage=i, attempt=1, steps=(i, i + 1),
                      total_steps=total, tensors=tensors,
                      meta={"method": "split", "role": role, "share": share, "pad_to": pad_result})
        data = encode(msg, pad_to_bytes=pad_task)
        t_pub = time.time()
        await self._client.publish(topics.task(self.run_id, dev), data, qos=1)
        deadline = time.monotonic() + self._deadline_s(predicted_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunFailedError(f"split step {i}: the {role} device {dev} missed its deadline "
                                     f"({self._deadline_s(predicted_s):.1f} s); see its split agent log")
            try:
                leaf, who, payload, t_in = await asyncio.wait_for(self._inbox.get(), timeout=left)
            except TimeoutError:
                continue
            if who != dev:
                continue
            if leaf == "status" and _json(payload).get("state") == "offline":
                raise RunFailedError(f"split step {i}: the {role} device {dev} went offline; split inference "
                                     "cannot continue without both segments")
            if leaf != "result":
                continue
            try:
                res = decode(payload, max_bytes=self.max_message_bytes, run=self.run_id, kind="result", device=dev,
                             total_steps=total, max_tensor_bytes=self.max_message_bytes)
                if res.stage != i or res.meta.get("role") != role:
                    raise RelayError(f"result for step {res.stage} role {res.meta.get('role')!r}, "
                                     f"expected step {i} role {role!r}")
                need = {"sample", "emb"} if role == "head" else {"noise"}
                if not need <= set(res.tensors):
                    raise RelayError(f"{role} result lacks tensors {sorted(need - set(res.tensors))}")
                t_recv, t_send = float(res.meta["t_recv"]), float(res.meta["t_send"])
                overrun, real = float(res.meta.get("overrun_s") or 0.0), float(res.meta.get("cmp_real_s") or 0.0)
            except (RelayError, KeyError, TypeError, ValueError) as e:
                await self.emit("result_rejected", device=dev, steps=[i, i + 1], error=str(e))
                continue
            return _Hop(t_down_s=t_recv - t_pub, t_cmp_s=t_send - t_recv, t_up_s=t_in - t_send, t_pub=t_pub, t_in=t_in,
                        overrun_s=overrun, cmp_real_s=real, msg=res, wire_bytes=len(payload))


def _np(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _json(payload: bytes) -> dict[str, Any]:
    try:
        v = json.loads(payload)
    except ValueError:
        return {}
    return v if isinstance(v, dict) else {}
